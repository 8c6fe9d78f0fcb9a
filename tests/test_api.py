"""The public surface: `import critlib` is light, and every name it offers resolves, documented."""

import subprocess
import sys

import pytest

import critlib


def test_import_critlib_loads_no_torch():
    code = "import sys, critlib; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


@pytest.mark.parametrize("name", sorted(critlib._EXPORTS))
def test_every_export_resolves_with_a_docstring(name):
    obj = getattr(critlib, name)
    assert obj.__name__ == name and (obj.__doc__ or "").strip(), name
    assert name in dir(critlib)


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        critlib.nope
