"""`resolve_inside`: paths named by data files stay under the dataset root or an allowed root."""

from __future__ import annotations

import pytest

from data_tools.paths import OutsideRootError, resolve_inside

pytestmark = pytest.mark.unit


@pytest.fixture
def tree(tmp_path):
    root, other = tmp_path / "data", tmp_path / "other"
    (root / "img").mkdir(parents=True)
    other.mkdir()
    (root / "img" / "a.png").write_bytes(b"a")
    (other / "b.png").write_bytes(b"b")
    (root / "img" / "inner_link.png").symlink_to(root / "img" / "a.png")
    (root / "img" / "escape.png").symlink_to(other / "b.png")
    (root / "dirlink").symlink_to(other, target_is_directory=True)
    return root, other


def test_paths_inside_the_root_resolve(tree):
    root, _ = tree
    assert resolve_inside(root, "img/a.png") == (root / "img" / "a.png").resolve()
    assert resolve_inside(root, "img/../img/a.png") == (root / "img" / "a.png").resolve()
    assert resolve_inside(root, str(root / "img" / "a.png")) == (root / "img" / "a.png").resolve()
    assert resolve_inside(root, "img/inner_link.png") == (root / "img" / "a.png").resolve()


@pytest.mark.parametrize(
    "value", ["../other/b.png", "img/../../other/b.png", "img/escape.png", "dirlink/b.png", "/etc/hostname"]
)
def test_paths_leaving_the_root_are_refused(tree, value):
    root, _ = tree
    with pytest.raises(OutsideRootError, match="outside the dataset root"):
        resolve_inside(root, value)


def test_an_allowed_root_admits_paths_under_it_only(tree):
    root, other = tree
    for value in ("../other/b.png", "img/escape.png", str(other / "b.png")):
        assert resolve_inside(root, value, allow_root=other) == (other / "b.png").resolve()
    assert resolve_inside(root, "img/a.png", allow_root=other) == (root / "img" / "a.png").resolve()
    with pytest.raises(OutsideRootError):
        resolve_inside(root, "/etc/hostname", allow_root=other)


def test_a_prefix_sibling_is_not_inside(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data2").mkdir()
    with pytest.raises(OutsideRootError):
        resolve_inside(tmp_path / "data", "../data2/x.png")


def test_nul_in_a_path_is_refused(tree):
    with pytest.raises(OutsideRootError, match="NUL"):
        resolve_inside(tree[0], "img/a.png\x00.txt")
