"""imagen.atomic: a write either lands whole or leaves the old content, never a torn file or a temp left over."""

import json

import pytest

from imagen.atomic import atomic_dir, atomic_path, write_json, write_json_lines


def test_write_json_replaces_whole_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "config.json"
    write_json(path, {"a": 1})
    write_json(path, {"a": 2, "text": "红色"})
    assert json.loads(path.read_text(encoding="utf-8")) == {"a": 2, "text": "红色"}
    assert [p.name for p in path.parent.iterdir()] == ["config.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_json_lines(path, [{"step": 1}, {"step": 2}])
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("half a li")
            raise RuntimeError("crash mid-write")
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


def test_atomic_dir_appears_complete_or_not_at_all(tmp_path):
    out = tmp_path / "checkpoint"
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(out) as tmp:
            (tmp / "weights").write_text("x")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(out) as tmp:
        (tmp / "weights").write_text("1")
    with atomic_dir(out, replace=True) as tmp:
        (tmp / "weights").write_text("2")
    assert (out / "weights").read_text() == "2"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]
