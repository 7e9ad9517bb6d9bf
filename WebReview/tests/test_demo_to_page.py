"""From the demo to the page: the demo's last step (scripts/demo_review.sh, run by scripts/demo.sh) on a small
trained demo, then the review command it prints, run as printed, shows the held-out case with its results in
Chromium: its finding and probability from the record, and the heatmap in the views."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from anymc3d_review.testing import VIEWS, ReviewServer, heatmap_fraction, open_page, state, view_pixels, wait_frames, \
    wait_state

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_demo_prints_a_review_command_that_shows_its_case_with_results(tmp_path, browser):
    from anymc3d.demo import write_trained_demo

    demo = tmp_path / "demo"
    write_trained_demo(demo, cases=8, epochs=2)  # the same files as `anymc3d demo demo`, a smaller training
    env = {**os.environ, "ANYMC3D_VENV": sys.prefix}  # the printed command names this environment's anymc3d
    done = subprocess.run(["bash", str(ROOT / "scripts" / "demo_review.sh"), str(demo)], capture_output=True,
                          text=True, encoding="utf-8", timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    printed = lines[lines.index(next(x for x in lines if x.startswith("Look at the results"))) + 1].strip()
    assert printed == f"{sys.prefix}/bin/anymc3d review {demo}/review"
    assert any(x.strip() == f"source {sys.prefix}/bin/activate && anymc3d review {demo}/review" for x in lines)

    review = demo / "review"
    (record,) = json.loads((review / "results" / "heldout.json").read_text(encoding="utf-8"))
    result = record["results"][0]
    label = result["labels"][0]
    with ReviewServer(None, command=shlex.split(printed), env={"PATH": os.environ["PATH"]}) as server:
        page = open_page(browser, server.url)
        wait_frames(page, 0, timeout=60)
        wait_state(page, "s('shown_case') === 0 && !s('heatmap_loading')")
        assert [(c["name"], c["status"]) for c in state(page, "cases")] == [("heldout.nii.gz", "results")]
        row = page.locator("tr.finding-row").first
        assert row.locator("td.finding-label").inner_text().strip() == label
        shown = row.locator("td.finding-probability").inner_text().strip()
        assert abs(float(shown.rstrip("%")) / (100 if shown.endswith("%") else 1)
                   - result["probabilities"][label]) <= 0.006
        for view in VIEWS:
            # 1 %: the additive overlay's colour starts at black at the threshold
            assert heatmap_fraction(view_pixels(page, view)) > 0.01, view
        page.close()
