"""Check and normalise one conversation before it reaches the chat template.

Everything a template could stringify into the literal text "None" is either rejected
(null content without tool calls) or removed (keys whose value is null), because Jinja
renders `None` as "None" and the model would be trained on it (Megatron-Bridge #5742).

The adaptations at the end (`arguments_as_objects`, `with_tool_schemas`, ...) reshape a
conversation the way real chat templates expect it; the renderer applies them, cumulatively
in the order of `sftkit.data.templates._variants`, only when the template rejects the data
as given.
"""

from __future__ import annotations

import json
from typing import Any

from sftkit.data.errors import DataError

Messages = list[dict[str, Any]]

ROLES = ("system", "developer", "user", "assistant", "tool", "ipython")
# transformers reads reasoning under any of these names and aliases them; we do the same so
# a row renders exactly as `apply_chat_template` would render it.
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def normalize_conversation(
    row: dict[str, Any], where: str
) -> tuple[list[dict[str, Any]], list[Any] | None]:
    """Return `(messages, tools)` from a row with `messages` (and optional `tools`).

    Raises `DataError` naming `where` and the message index for a missing key, a wrong
    type, an unknown role, or an empty/null assistant turn.
    """
    if not isinstance(row, dict):
        raise DataError(where, f"expected an object with 'messages', got {type(row).__name__}.")
    if "messages" not in row:
        raise DataError(
            where,
            f"missing key 'messages' (keys: {sorted(row)}).",
            "give each row a 'messages' list, or set the dataset's input_key/output_key "
            "(ResponseDataset) or chat_key (openai_format) to the columns your data uses.",
        )
    raw = row["messages"]
    if not isinstance(raw, list) or not raw:
        raise DataError(
            where,
            f"'messages' must be a non-empty list of {{role, content}} objects, got {_kind(raw)}.",
        )
    messages = [_normalize_message(m, f"{where} message {k}") for k, m in enumerate(raw)]
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(
            where,
            "the conversation has no assistant turn, so nothing would be trained.",
            "add the assistant's reply, or remove the row.",
        )
    return messages, _normalize_tools(row.get("tools"), where)


def _normalize_message(message: Any, where: str) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise DataError(
            where, f"expected an object with 'role' and 'content', got {_kind(message)}."
        )
    role = message.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise DataError(
            where,
            f"unknown role {role!r}.",
            f"use one of {', '.join(ROLES)} (ShareGPT 'human'/'gpt' must be mapped to user/assistant).",
        )
    out = {key: value for key, value in message.items() if value is not None}
    tool_calls = out.get("tool_calls")
    if tool_calls is not None:
        out["tool_calls"] = _normalize_tool_calls(tool_calls, where)
    reasoning = next((out[k] for k in REASONING_FIELDS if isinstance(out.get(k), str)), None)
    if reasoning is not None:
        out = {"thinking": reasoning, **out, "reasoning_content": reasoning}
    out["content"] = _normalize_content(message.get("content", _MISSING), role, out, where)
    return out


_MISSING = object()


def _normalize_content(content: Any, role: str, message: dict[str, Any], where: str) -> str:
    has_calls = bool(message.get("tool_calls"))
    if content is _MISSING and not has_calls:
        raise DataError(where, f"{role} message has no 'content' key.", "add 'content' (a string).")
    if content is None or content is _MISSING:
        if has_calls:
            return ""  # an assistant turn that only calls tools
        fix = "write the reply, or drop the row" if role == "assistant" else "use a string"
        raise DataError(where, f"{role} message has content null.", fix + ".")
    if isinstance(content, list):  # OpenAI content parts: text only
        texts = []
        for part in content:
            if not (isinstance(part, dict) and isinstance(part.get("text"), str)):
                raise DataError(
                    where, "content parts must be {'type': 'text', 'text': str} objects."
                )
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise DataError(
            where,
            f"{role} content must be a string, got {_kind(content)}.",
            "convert it to a string in your data.",
        )
    if (
        role == "assistant"
        and not content.strip()
        and not has_calls
        and "reasoning_content" not in message
    ):
        raise DataError(where, "empty assistant turn.", "write the reply, or drop the row.")
    return content


def _normalize_tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    """Accept the seed's flat `{name, arguments}` and OpenAI's nested form; emit nested.

    Argument dicts are passed through as they are: never re-ordered, never None-filled.
    """
    if not isinstance(calls, list):
        raise DataError(where, f"'tool_calls' must be a list, got {_kind(calls)}.")
    out = []
    for k, call in enumerate(calls):
        if not isinstance(call, dict):
            raise DataError(where, f"tool_calls[{k}] must be an object, got {_kind(call)}.")
        function = call.get("function", call)
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise DataError(
                where,
                f"tool_calls[{k}] has no function name.",
                "use {'name': ..., 'arguments': {...}} or "
                "{'type': 'function', 'function': {'name': ..., 'arguments': {...}}}.",
            )
        arguments = function.get("arguments", {})
        if not isinstance(arguments, (dict, str)):
            raise DataError(where, f"tool_calls[{k}].arguments must be an object or a JSON string.")
        nested: dict[str, Any] = {
            "type": "function",
            "function": {"name": function["name"], "arguments": arguments},
        }
        if call.get("id") is not None:
            nested["id"] = call["id"]
        out.append(nested)
    return out


def _normalize_tools(tools: Any, where: str) -> list[Any] | None:
    if tools is None:
        return None
    if isinstance(tools, str):  # TRL and others store tools as a JSON string
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as err:
            raise DataError(where, f"'tools' is a string but not valid JSON ({err}).") from err
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise DataError(
            where, f"'tools' must be a list of tool schemas (objects), got {_kind(tools)}."
        )
    return tools or None


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


# -- adaptations for real chat templates ---------------------------------------------------
def arguments_as_objects(messages: Messages) -> Messages | None:
    """Tool-call arguments given as a JSON string (OpenAI's wire format) decoded to objects.

    Templates apply `tojson` to the arguments (Qwen2.5, Llama 3.1, DeepSeek-V3, Hermes) or
    iterate them (Gemma 3, GLM-4.5); a string is then double-encoded into a quoted scalar,
    or split into characters, and the model is trained on it. vLLM decodes them the same way
    before rendering. None when no argument is a string holding a JSON object.
    """
    return _map_arguments(messages, _decoded)


def arguments_as_strings(messages: Messages) -> Messages | None:
    """Tool-call arguments as JSON strings, for templates that concatenate them (DeepSeek-R1)."""
    return _map_arguments(
        messages, lambda a: a if isinstance(a, str) else json.dumps(a, ensure_ascii=False)
    )


def with_tool_schemas(tools: list[Any] | None) -> list[Any] | None:
    """Flat tools (`{name, description, parameters}`, the seed's example) as OpenAI schemas.

    `{"type": "function", "function": {...}}`, with bare parameter maps wrapped as
    `{"type": "object", "properties": ...}`: Llama 3.1, Mistral, gpt-oss and Hermes read
    `tool.function.parameters.properties`. None when every tool already has that form.
    """
    if not tools or all("function" in t for t in tools):
        return None
    out = []
    for tool in tools:
        if "function" in tool or "name" not in tool:
            out.append(tool)
            continue
        function = dict(tool)
        params = function.get("parameters")
        if isinstance(params, dict) and "type" not in params and "properties" not in params:
            function["parameters"] = {"type": "object", "properties": params}
        out.append({"type": "function", "function": function})
    return out


def with_tool_result_names(messages: Messages) -> Messages | None:
    """Tool results given the name of the call they answer (Hermes requires `name`).

    Matched by `tool_call_id`, else by position among the preceding assistant's calls.
    None when no tool message lacks a name that can be found.
    """
    out, changed, calls, k = [], False, [], 0
    for message in messages:
        if message["role"] == "assistant" and message.get("tool_calls"):
            calls, k = message["tool_calls"], 0
        elif message["role"] == "tool" and "name" not in message and calls:
            by_id = [c for c in calls if c.get("id") and c["id"] == message.get("tool_call_id")]
            call = by_id[0] if by_id else calls[min(k, len(calls) - 1)]
            message = {**message, "name": call["function"]["name"]}
            changed, k = True, k + 1
        out.append(message)
    return out if changed else None


def fold_system(messages: Messages) -> Messages | None:
    """A leading system message prepended to the first user turn (as Gemma's templates do)."""
    if len(messages) < 2 or messages[0]["role"] != "system" or messages[1]["role"] != "user":
        return None
    first = dict(messages[1])
    first["content"] = f"{messages[0]['content']}\n\n{first['content']}"
    return [first, *messages[2:]]


def _map_arguments(messages: Messages, convert: Any) -> Messages | None:
    out, changed = [], False
    for message in messages:
        calls = message.get("tool_calls")
        if calls:
            new_calls = []
            for call in calls:
                args = call["function"]["arguments"]
                new = convert(args)
                if new is not args:  # converters return the same object when unchanged
                    changed = True
                    call = {**call, "function": {**call["function"], "arguments": new}}
                new_calls.append(call)
            message = {**message, "tool_calls": new_calls}
        out.append(message)
    return out if changed else None


def _decoded(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            value = json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
        return value if isinstance(value, dict) else arguments
    return arguments
