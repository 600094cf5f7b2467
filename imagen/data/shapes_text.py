"""English and Chinese caption and question templates for the Shapes world's scenes (see `shapes_scene`)."""

from __future__ import annotations

from collections import Counter

import numpy as np

from .shapes_scene import COLORS, SHAPES, relation

NUMBER_EN = {1: "a", 2: "two", 3: "three"}
COLOR_ZH = {"red": "红色", "yellow": "黄色", "green": "绿色", "cyan": "青色", "blue": "蓝色", "purple": "紫色"}
SHAPE_ZH = {"circle": "圆形", "square": "正方形", "triangle": "三角形"}
SIZE_ZH = {"small": "小", "large": "大"}
NUMBER_ZH = {1: "一个", 2: "两个", 3: "三个"}
POSITION_ZH = {"top left": "左上方", "top": "上方", "top right": "右上方", "left": "左边", "center": "中间",
               "right": "右边", "bottom left": "左下方", "bottom": "下方", "bottom right": "右下方"}
RELATION_ZH = {"left of": "左边", "right of": "右边", "above": "上面", "below": "下面"}
YES_NO = {"en": ("yes", "no"), "zh": ("是", "否")}
# English position phrases read naturally with different prepositions.
POSITION_EN = {"top": "at the top", "bottom": "at the bottom", "left": "on the left", "right": "on the right",
               "center": "in the center"}


def _coin(rng: np.random.Generator, p: float) -> bool:
    return bool(rng.random() < p)


def object_name(obj: dict, lang: str) -> str:
    """Colour + shape name without article: 'red circle' / '红色圆形'."""
    if lang == "zh":
        return COLOR_ZH[obj["color"]] + SHAPE_ZH[obj["shape"]]
    return f"{obj['color']} {obj['shape']}"


def object_phrase(obj: dict, lang: str, with_size: bool = False, with_pos: bool = False) -> str:
    """One object as a caption phrase, optionally with its size and position: 'a small red circle on the left'."""
    return _phrase_zh(obj, with_size, with_pos) if lang == "zh" else _phrase_en(obj, with_size, with_pos)


def _phrase_en(obj: dict, with_size: bool, with_pos: bool) -> str:
    size = f"{obj['size']} " if with_size else ""
    pos = f" {POSITION_EN.get(obj['position'], 'in the ' + obj['position'])}" if with_pos else ""
    return f"a {size}{obj['color']} {obj['shape']}{pos}"


def _phrase_zh(obj: dict, with_size: bool, with_pos: bool) -> str:
    # One 的 per phrase reads naturally: 一个红色的圆形 / 一个小的红色圆形.
    if with_size:
        body = f"一个{SIZE_ZH[obj['size']]}的{COLOR_ZH[obj['color']]}{SHAPE_ZH[obj['shape']]}"
    else:
        body = f"一个{COLOR_ZH[obj['color']]}的{SHAPE_ZH[obj['shape']]}"
    return f"{POSITION_ZH[obj['position']]}有{body}" if with_pos else body


def _join(parts: list[str], lang: str, clauses: bool = False) -> str:
    if len(parts) == 1:
        return parts[0]
    if lang == "zh" and clauses:
        return "，".join(parts)  # "左上方有…，右边有…" are whole clauses
    if lang == "zh":
        return "、".join(parts[:-1]) + "和" + parts[-1]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def objects_phrase(objects: list[dict], lang: str) -> str:
    """Objects named side by side, as captions name them: 'a purple circle and a green square' / '一个紫色的圆形和一个绿色的方形'."""
    return _join([object_phrase(o, lang) for o in objects], lang)


def group_phrase(color: str, shape: str, k: int, lang: str) -> str:
    """k identical objects counted: 'two green triangles' / '两个绿色的三角形'."""
    if lang == "zh":
        return f"{NUMBER_ZH[k]}{COLOR_ZH[color]}的{SHAPE_ZH[shape]}"
    return f"{NUMBER_EN[k]} {color} {shape}" + ("s" if k > 1 else "")


def relation_phrase(a: dict, b: dict, lang: str) -> str:
    """Object a's spatial relation to b as a caption: 'a red circle to the left of a blue square'."""
    rel = relation(a, b)
    if lang == "zh":
        return f"{object_name(a, lang)}在{object_name(b, lang)}的{RELATION_ZH[rel]}"
    rel_en = {"left of": "to the left of", "right of": "to the right of"}.get(rel, rel)
    return f"a {object_name(a, lang)} {rel_en} a {object_name(b, lang)}"


def caption(objects: list[dict], rng: np.random.Generator, lang: str = "en", p_relation: float = 0.35) -> str:
    """A caption naming every object's colour and shape, with optional size, position or relation (a pair of
    different objects is worded by its relation with probability p_relation)."""
    groups = Counter((o["color"], o["shape"]) for o in objects)
    style = rng.random()
    if len(objects) == 2 and len(groups) == 2 and style < p_relation:
        return relation_phrase(objects[0], objects[1], lang)
    with_size, with_pos = _coin(rng, 0.35), _coin(rng, 0.35)
    if len(groups) < len(objects) and (style < 0.7 or not (with_size or with_pos)):
        # Identical objects read best counted ("two green triangles") unless size/position tells them apart.
        parts = [group_phrase(c, s, k, lang) for (c, s), k in groups.items()]
        with_pos = False
    else:
        parts = [object_phrase(o, lang, with_size, with_pos) for o in objects]
    text = _join(parts, lang, clauses=with_pos)
    if lang == "zh":
        prefix = ("", "图中有", "画面里有")[rng.integers(3)]
        return prefix + text if prefix and "有" not in text else text
    prefix = ("", "", "there is ", "an image of ", "a picture with ")[rng.integers(5)]
    if prefix == "there is " and not text.startswith("a "):
        prefix = "there are "  # "there are two cyan squares"
    return prefix + text


def _q(question: str, answer: str, kind: str) -> dict:
    return {"question": question, "answer": answer, "type": kind}


def questions(objects: list[dict], rng: np.random.Generator, lang: str = "en") -> list[dict]:
    """Question-answer pairs of types color, shape, count, exists, position and relation."""
    zh = lang == "zh"
    yes, no = YES_NO[lang]
    shape_n = Counter(o["shape"] for o in objects)
    color_n = Counter(o["color"] for o in objects)
    name_n = Counter(object_name(o, "en") for o in objects)
    out = []
    for o in objects:  # ask only about uniquely identifiable objects so every answer is unambiguous
        if shape_n[o["shape"]] == 1:
            out.append(_q(f"{SHAPE_ZH[o['shape']]}是什么颜色？", COLOR_ZH[o["color"]], "color") if zh else
                       _q(f"what color is the {o['shape']}?", o["color"], "color"))
        if color_n[o["color"]] == 1:
            out.append(_q(f"{COLOR_ZH[o['color']]}的物体是什么形状？", SHAPE_ZH[o["shape"]], "shape") if zh else
                       _q(f"what shape is the {o['color']} object?", o["shape"], "shape"))
        if name_n[object_name(o, "en")] == 1:
            out.append(_q(f"{object_name(o, lang)}在哪里？", POSITION_ZH[o["position"]], "position") if zh else
                       _q(f"where is the {object_name(o, lang)}?", o["position"], "position"))
    n = len(objects)
    out.append(_q("图中有几个物体？", str(n), "count") if zh else _q("how many objects are there?", str(n), "count"))
    present = objects[rng.integers(n)]
    absent = [(c, s) for c in COLORS for s in SHAPES if (f"{c} {s}") not in name_n]
    c, s = absent[rng.integers(len(absent))]
    for obj, ans in ((present, yes), ({"color": c, "shape": s}, no)):
        out.append(_q(f"图中有{object_name(obj, lang)}吗？", ans, "exists") if zh else
                   _q(f"is there a {object_name(obj, lang)}?", ans, "exists"))
    for a in objects:
        for b in objects:
            if a is b or name_n[object_name(a, "en")] > 1 or name_n[object_name(b, "en")] > 1:
                continue
            rel = relation(a, b)
            out.append(_q(f"{object_name(a, lang)}在{object_name(b, lang)}的哪边？", RELATION_ZH[rel], "relation") if zh else
                       _q(f"where is the {object_name(a, lang)} relative to the {object_name(b, lang)}?", rel, "relation"))
    return out
