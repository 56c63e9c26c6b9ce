"""Chat templates are untrusted input: the Jinja floor and one escape attempt per known CVE.

Every template renders in transformers' `ImmutableSandboxedEnvironment`
(`sftkit.data.templates.compile_template`). Jinja releases below the floor in
pyproject.toml let a template out of that sandbox; each test below is an escape that worked
on one of them (checked against the vulnerable release) and must be refused here.
"""

from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path

import jinja2
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment
from packaging.version import Version

from sftkit.data.templates import ChatRenderer, TemplateRejected, compile_template

REPO = Path(__file__).resolve().parents[3]
FLOOR = Version("3.1.6")  # 3.1.5: CVE-2025-27516; 3.1.4: CVE-2024-56201, CVE-2024-56326
CANARY = "canary-environ-value-5150"
MESSAGES = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


@pytest.fixture(autouse=True)
def _canary(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SFTKIT_TEST_API_KEY", CANARY)


def test_jinja_floor_is_declared_and_installed() -> None:
    text = (REPO / "pyproject.toml").read_text()
    declared = re.findall(r'"jinja2>=([0-9.]+)"', text)
    assert declared and Version(declared[0]) >= FLOOR, declared
    assert Version(version("jinja2")) >= FLOOR


def _refused(source: str) -> None:
    """The template raises (in the compiled template and in the renderer) and leaks nothing."""
    with pytest.raises(jinja2.exceptions.SecurityError):
        compile_template(source).render(messages=MESSAGES)
    with pytest.raises(TemplateRejected) as info:
        ChatRenderer(source).render(MESSAGES)
    assert CANARY not in str(info.value)


@pytest.mark.parametrize(
    "source",
    [
        # 3.1.5 renders os.environ: |attr skipped the sandbox's str.format wrapper.
        "{{ ('{0.__init__.__globals__[os].environ}'|attr('format'))(cycler) }}",
        "{{ ('{x.__init__.__globals__[os].environ}'|attr('format_map'))({'x': cycler}) }}",
    ],
)
def test_cve_2025_27516_format_through_attr_filter(source: str) -> None:
    _refused(source)


@pytest.mark.parametrize(
    "source",
    [
        # A stored reference to a malicious string's format method, called later.
        "{% set f = '{0.__init__.__globals__[os].environ}'.format %}{{ f(cycler) }}",
        "{% set f = '{x.__init__.__globals__[os].environ}'.format_map %}{{ f({'x': cycler}) }}",
        "{{ '{0.__init__.__globals__[os].environ}'.format(cycler) }}",
    ],
)
def test_cve_2024_56326_indirect_str_format(source: str) -> None:
    _refused(source)


def test_cve_2024_56201_template_name_never_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Jinja <= 3.1.4 compiled a template's name into Python code: a name holding `{...}`
    ran when an import in the template failed. sftkit compiles template text only (a
    `.jinja` path's name never reaches the compiler), and the floor fixes the compiler."""
    monkeypatch.chdir(tmp_path)  # a short command: the name must fit in a file name
    marker = tmp_path / "pwned"
    command = list(b"touch pwned")
    name = f"x{{__import__(bytes([111,115]).decode()).system(bytes({command}).decode())}}"
    source = "{% from 'a' import missing %}{{ missing }}"
    template_file = tmp_path / f"{name}.jinja"
    template_file.write_text(source)
    with pytest.raises(TemplateRejected):  # no loader: the import is refused
        ChatRenderer(template_file.read_text()).render(MESSAGES)
    loader = jinja2.DictLoader({name: source, "a": "no exports"})
    ImmutableSandboxedEnvironment(loader=loader).get_template(name).render()
    assert not marker.exists()
