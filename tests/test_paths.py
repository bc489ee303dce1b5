"""Names and relative paths read from files: what becomes a path component, and what may be followed."""

import os

import pytest

from rmc.errors import RMCError
from rmc.paths import MAX_NAME, inside, safe_name


@pytest.mark.parametrize("name", ["clean", "pgd10-eps0.1-targeted", "standard-215b7ea6", "a=b+c@d,e", "x" * MAX_NAME])
def test_plain_names_pass(name):
    assert safe_name(name, "set name") == name


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", "a\\b", "/etc", ".hidden", "a b", "a\x00b", "é",
                                  "x" * (MAX_NAME + 1), 3, None, ["a"]])
def test_hostile_names_refused_in_one_line(name):
    with pytest.raises(RMCError) as e:
        safe_name(name, "set name", "index.json")
    assert "\n" not in str(e.value) and "index.json" in str(e.value) and "set name" in str(e.value)


def test_inside_follows_relative_paths_and_refuses_escapes(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.bin").write_bytes(b"1")
    assert inside(tmp_path, "sub/a.bin", "file") == (tmp_path / "sub" / "a.bin").resolve()
    for bad in ["../y", "sub/../../y", "/etc/passwd", "", None, 5]:
        with pytest.raises(RMCError):
            inside(tmp_path / "sub", bad, "file", "index.json")


def test_inside_refuses_a_symlink_that_leads_out(tmp_path):
    (tmp_path / "outside").write_bytes(b"1")
    (tmp_path / "folder").mkdir()
    os.symlink(tmp_path / "outside", tmp_path / "folder" / "link")
    with pytest.raises(RMCError, match="outside"):
        inside(tmp_path / "folder", "link", "file")
