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
# every C0 control, DEL and every C1 control (NEL, CSI, ...)
CONTROLS = [chr(c) for c in [*range(0x20), *range(0x7F, 0xA0)]]
# the bidirectional marks, embeddings, overrides and isolates (U+202E shows `gpj.exe` backwards)
BIDI = ["\u061c", "\u200e", "\u200f", *map(chr, range(0x202A, 0x202F)),
        *map(chr, range(0x2066, 0x206A))]
BAD_COMPONENTS += [(f"photo{c}x.jpg", "a control character") for c in CONTROLS]
BAD_COMPONENTS += [(f"photo{c}gpj.exe", "a bidirectional control character") for c in BIDI]


@pytest.mark.parametrize("name, why", BAD_COMPONENTS)
def test_bad_components_are_refused_naming_source_and_entry(name, why):
    with pytest.raises(UnsafeName, match=why) as info:
        check_component(name, source="sources.web", entry="row 7")
    assert str(info.value).startswith("sources.web: row 7: refused name")


def test_a_refused_character_is_shown_escaped_in_the_message():
    for c in ["\x1b", "\x85", "\u202e"]:
        with pytest.raises(UnsafeName) as info:
            check_component(f"a{c}b", source="s", entry="e")
        assert c not in str(info.value) and repr(f"a{c}b") in str(info.value)


@pytest.mark.parametrize("name", ["photo.jpg", "训练 图片.png", "a..b", "...", "%2F", "100%",
                                  "x" * MAX_COMPONENT_BYTES, "名" * (MAX_COMPONENT_BYTES // 3),
                                  "صورة.jpg", "תמונה.jpg",  # right-to-left letters are letters
                                  "a\xa0b", "\u00a9 2024",  # no-break space, the first after C1
                                  "👩\u200d🔬.jpg"])  # a zero-width joiner inside an emoji
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
    ("a\x85b/c.jpg", "a control character"),  # NEL, a C1 line break
    ("train/evil\u202egpj.exe", "a bidirectional control character"),
    ("\u2067x/y.jpg", "a bidirectional control character"),
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
    ("https://h/evil%0A.jpg", "a control character"),
    ("https://h/evil%7F.jpg", "a control character"),
    ("https://h/evil%C2%9B.jpg", "a control character"),  # CSI (U+009B) in UTF-8
    ("https://h/evil%E2%80%AEgpj.exe", "a bidirectional control character"),  # U+202E
    ("https://h/a%D8%9Cb.jpg", "a bidirectional control character"),  # U+061C
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
