"""tasks/names.py: every name from outside is checked as the file system will see it."""

from __future__ import annotations

from pathlib import PurePosixPath

import pytest

from tasks.names import (MAX_COMPONENT_BYTES, MAX_PATH_BYTES, UnsafeName, check_component,
                         check_relative_path, url_file_name)

# (name, why) pairs: each is refused as one file or folder name
BAD_COMPONENTS = [
    ("", "an empty name"),
    (".", "current or parent folder"),
    ("..", "current or parent folder"),
    ("a/b", "a path separator"),
    ("a\\b", "a path separator"),
    ("a\x00b", "a control character"),
    ("a\nb", "a control character"),
    ("C:", "a Windows drive letter"),
    ("c:evil.exe", "a Windows drive letter"),
    ("\uff0e\uff0e", "current or parent folder"),  # fullwidth `．．`: NFKC makes it `..`
    ("a\uff0fb", "a path separator"),  # fullwidth solidus `／`
    ("a\uff3cb", "a path separator"),  # fullwidth reverse solidus `＼`
    ("\uff23:x", "a Windows drive letter"),  # fullwidth `Ｃ:`
    ("x" * (MAX_COMPONENT_BYTES + 1), f"more than {MAX_COMPONENT_BYTES} bytes"),
    ("é" * (MAX_COMPONENT_BYTES // 2 + 1), f"more than {MAX_COMPONENT_BYTES} bytes"),  # in UTF-8
]


@pytest.mark.parametrize("name, why", BAD_COMPONENTS)
def test_bad_components_are_refused_naming_source_and_entry(name, why):
    with pytest.raises(UnsafeName, match=why) as info:
        check_component(name, source="sources.web", entry="row 7")
    assert str(info.value).startswith("sources.web: row 7: refused name")


@pytest.mark.parametrize("name", ["photo.jpg", "训练 图片.png", "a..b", "...", "%2F", "100%",
                                  "x" * MAX_COMPONENT_BYTES, "名" * (MAX_COMPONENT_BYTES // 3)])
def test_ordinary_names_pass_unchanged(name):
    assert check_component(name, source="s", entry="e") == name


@pytest.mark.parametrize("name, why", [
    ("/etc/passwd", "an absolute path"),
    ("\\\\server\\share", "an absolute path"),
    ("C:/Windows/x", "an absolute path"),
    ("d:\\x", "an absolute path"),
    ("a/../../b", "current or parent folder"),
    ("..", "current or parent folder"),
    ("a/b\\..\\c", "a path separator"),
    ("a/\uff0e\uff0e/b", "current or parent folder"),
    ("a/b\x00.jpg", "a control character"),
    ("a/" + "x" * (MAX_COMPONENT_BYTES + 1), f"more than {MAX_COMPONENT_BYTES} bytes"),
    ("a/" * (MAX_PATH_BYTES // 2) + "x", f"more than {MAX_PATH_BYTES} bytes"),
    ("./", "no file name"),
])
def test_bad_relative_paths_are_refused(name, why):
    with pytest.raises(UnsafeName, match=why):
        check_relative_path(name, source="sources.csv", entry="labels.csv")


def test_relative_paths_are_normalised_to_their_components():
    got = check_relative_path("./train//a/b.jpg", source="s", entry="e")
    assert got == PurePosixPath("train/a/b.jpg")


@pytest.mark.parametrize("url, why", [
    ("https://h/x%2F..%2F..%2Fevil.sh", "a path separator"),
    ("https://h/x%2f..%2fevil.sh", "a path separator"),
    ("https://h/..%5C..%5Cevil.bat", "a path separator"),
    ("https://h/evil%00.jpg", "a control character"),
    ("https://h/a/%2E%2E", "current or parent folder"),
    ("https://h/%EF%BC%8E%EF%BC%8E", "current or parent folder"),  # fullwidth `．．` in UTF-8
    ("https://h/a%EF%BC%8Fb.jpg", "a path separator"),  # fullwidth `／`
    ("https://h/C:evil.exe", "a Windows drive letter"),
    ("https://h/" + "x" * 300 + ".jpg", f"more than {MAX_COMPONENT_BYTES} bytes"),
    ("https://h/dir/", "an empty name"),
])
def test_url_file_names_are_checked_after_decoding(url, why):
    with pytest.raises(UnsafeName, match=why) as info:
        url_file_name(url, source="sources.glr")
    assert str(info.value).startswith(f"sources.glr: {url}: refused name")


def test_url_file_names_decode_once_and_a_default_stands_for_no_name():
    assert url_file_name("https://h/a/b%20c.jpg?x=1#y", source="s") == "b c.jpg"
    assert url_file_name("https://h/a%252F.jpg", source="s") == "a%2F.jpg"  # decoded once only
    assert url_file_name("https://h/dir/", source="s", default="download") == "download"
