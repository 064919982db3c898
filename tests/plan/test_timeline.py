"""The timeline picture: well-formed SVG, one lane per device involved, one box per compute and transfer."""

from __future__ import annotations

import importlib.util
import itertools
import xml.etree.ElementTree as ET

import pytest

from layerline.errors import PlanError
from layerline.plan import Device, PlanningProblem, evaluate_placement, full_mesh, optimize
from layerline.plan.timeline import save_timeline, timeline_boxes, timeline_lanes, timeline_svg

SVG = "{http://www.w3.org/2000/svg}"


def _problem(source="cam", sink=None) -> PlanningProblem:
    names = ("cam", "a", "b", "c")
    lat, bw = full_mesh(names, 0.001, 1e6)
    n = 6
    return PlanningProblem(
        compute_s={"cam": [0.02] * n, "a": [0.004] * n, "b": [0.005] * n, "c": [0.006] * n},
        weight_bytes=[1000] * n,
        activation_bytes=[100] * n,
        boundary_bytes=[4000, 8000, 2000, 2000, 1000, 500, 400],
        devices=[Device(x) for x in names],
        latency_s=lat,
        bandwidth_Bps=bw,
        source=source,
        sink=sink,
    )


def _parse(svg: str) -> ET.Element:
    return ET.fromstring(svg.encode("utf-8"))


def test_svg_has_a_lane_per_device_and_a_box_per_step():
    p = _problem()
    placement = evaluate_placement(p, [(0, 2, "a"), (2, 4, "b"), (4, 6, "c")])
    root = _parse(timeline_svg(placement, "cam", title="three stages <&>"))
    assert root.tag == f"{SVG}svg"
    lanes = [g.get("data-device") for g in root.iter(f"{SVG}g") if g.get("class") == "lane"]
    assert lanes == ["cam", "a", "b", "c"]  # the source/sink, then the stages in order
    rects = list(root.iter(f"{SVG}rect"))
    compute = [r for r in rects if r.get("class") == "compute"]
    transfer = [r for r in rects if r.get("class") == "transfer"]
    assert [(r.get("data-device"), r.get("data-stage")) for r in compute] == [
        ("a", "0"),
        ("b", "1"),
        ("c", "2"),
    ]
    # cam → a, a → b, b → c, and c → cam (the sink)
    assert [r.get("data-device") for r in transfer] == ["a", "b", "c", "cam"]
    # boxes run left to right without overlap, and the last one ends at the right edge of the plot
    xs = [
        (float(r.get("x")), float(r.get("width"))) for r in rects if r.get("class") in ("compute", "transfer")
    ]
    for (x0, w0), (x1, _) in itertools.pairwise(xs):
        assert x1 == pytest.approx(x0 + w0, abs=0.02)
    text = " ".join(t.text or "" for t in root.iter(f"{SVG}text"))
    assert "predicted latency" in text and "three stages <&>" in text
    assert "compute" in text and "transfer" in text  # the legend


def test_boxes_add_up_to_the_predicted_latency():
    p = _problem(sink="b")
    placement = optimize(p, "latency")
    boxes = timeline_boxes(placement, "cam", "b")
    end = boxes[-1].start_s + boxes[-1].duration_s
    assert end == pytest.approx(placement.latency_s)
    assert sum(b.kind == "compute" for b in boxes) == len(placement.stages)
    assert set(timeline_lanes(placement, "cam", "b")) == {"cam", "b"} | {d for _, _, d in placement.stages}


def test_stage_on_the_source_has_no_input_transfer():
    p = _problem()
    placement = evaluate_placement(p, [(0, 3, "cam"), (3, 6, "a")])
    root = _parse(timeline_svg(placement, "cam"))
    lanes = [g.get("data-device") for g in root.iter(f"{SVG}g") if g.get("class") == "lane"]
    assert lanes == ["cam", "a"]
    kinds = [r.get("class") for r in root.iter(f"{SVG}rect") if r.get("class") in ("compute", "transfer")]
    assert kinds == ["compute", "transfer", "compute", "transfer"]


def test_save_svg_and_png_or_a_clear_error(tmp_path):
    placement = evaluate_placement(_problem(), [(0, 6, "a")])
    out = save_timeline(placement, tmp_path / "t.svg", "cam")
    _parse(out.read_text(encoding="utf-8"))
    with pytest.raises(PlanError, match=r"use \.svg or \.png"):
        save_timeline(placement, tmp_path / "t.gif", "cam")
    if importlib.util.find_spec("matplotlib") is None:
        with pytest.raises(PlanError, match=r"matplotlib.*t\.svg"):
            save_timeline(placement, tmp_path / "t.png", "cam")
        assert not (tmp_path / "t.png").exists()
    else:
        save_timeline(placement, tmp_path / "t.png", "cam")
        assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
