"""Which map ``--heatmap-method auto`` opens for a plugin measured by ``real_anatomy_maps.py``: its measurements of
the engine's methods (``occlusion`` = the engine's default block and depth) become the plugin's model card, recorded
into a copy of the plugin, and ``anymc3d.engine.auto_heatmap_method`` reads that copy.

    python benchmarks/real_anatomy_card.py benchmarks/results/real-anatomy-maps-lora-cpu-2026-12-07.json \\
        /tmp/maps21/lora/plugin_lora.anymc3d
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from anymc3d import heatmap as hm
from anymc3d.encoders import SliceEncoder
from anymc3d.engine import auto_heatmap_method
from anymc3d.localisation import model_card
from anymc3d.plugin import load_plugin, record_localisation


def main(results: Path, plugin: Path) -> None:
    measured = json.loads(results.read_text())["localisation"]
    names = {m: m for m in SliceEncoder.forward_heatmaps + hm.GRADIENT_METHODS}
    names[hm.OCCLUSION] = f"occlusion_b{hm.OCCLUSION_BLOCK}_d{hm.OCCLUSION_DEPTH}"
    card = model_card({m: measured[k] for m, k in names.items()},
                      "MNI152 T1, lesion r 12-16 mm, +80 % WM (benchmarks/real_anatomy_maps.py)")
    copy = shutil.copy(plugin, plugin.with_name(plugin.stem + "_card.anymc3d"))
    record_localisation(copy, card)
    methods = SliceEncoder.forward_heatmaps + SliceEncoder.finding_heatmaps
    print(json.dumps(card, indent=1))
    print(f"best: {card['best']}; --heatmap-method auto opens: {auto_heatmap_method(load_plugin(copy).config, methods)}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
