"""Engine speed and memory, every number measured in this one run (not a timed test).

1. Throughput on the same preprocessed slices (ViT-S/14 at 224^2, 64 slices by default):
     timm            plain eager ``forward_features`` in chunks (fp32, no LoRA, no pooling): the floor;
     engine          ``Engine.predict_slices`` with one plugin and the paper's attention heatmap, LoRA as adapters;
     engine merged   the same with the plugin's LoRA merged into the weights (``merge_lora=True``);
     engine compiled merged and ``torch.compile``d (``--compile``; falls back to eager where it cannot compile),
   each as a time ratio to the timm row.
2. Each extra plugin's cost: one case through 1, 2 and 3 plugins (their own LoRA, shared preprocessing).
3. Peak memory (resident set of a fresh process) against slice count at a fixed chunk: flat beyond the chunk.
4. The CLI, as the Slicer module runs it: time from process start to the record written for one volume, split
   into start-up (interpreter, imports, backbone and plugin load), reading + preprocessing, encoding (with
   the heatmap) and writing, from the arrival times of its ``--progress json`` events.

    python benchmarks/bench_engine.py                 # CPU; add --compile for the compiled row (minutes to compile)
    python benchmarks/bench_engine.py --device cuda --backbones dinov2_vitl14_reg --slices 256
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from anymc3d.backbone import BackboneSpec, LoadedBackbone, create_backbone, make_load_bearing, save_backbone
from anymc3d.demo import random_plugin
from anymc3d.engine import Engine
from anymc3d.plugin import LoadedPlugin, save_plugin
from anymc3d.image_writing import write_image_atomic
from anymc3d.preprocess_config import PreprocessConfig
from anymc3d.preprocessing import to_model_input
from anymc3d.synthetic import make_ct_volume


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device, repeats):
    fn()  # warm-up (and compilation, for the compiled row)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _plugins(model, spec, n):
    out = []
    for seed in range(n):
        config, head, lora = random_plugin(model, spec, name=f"p{seed}", seed=seed,
                                           preprocessing=PreprocessConfig(input_size=spec.img_size))
        out.append(LoadedPlugin(config=config, head=head, lora=lora))
    return out


def throughput(name, device, slices, size, chunk, repeats, compile_row, plugin_rows=True):
    spec = BackboneSpec(name, img_size=size)
    model = make_load_bearing(create_backbone(spec))
    plugins = _plugins(model, spec, 3)
    plain = make_load_bearing(create_backbone(spec)).to(device)  # same weights, no adapters
    fp = plugins[0].config.backbone_fingerprint
    volume = torch.rand(slices, size, size)

    def engine_with(n=1, **options):
        bb = make_load_bearing(create_backbone(spec))
        engine = Engine(LoadedBackbone(bb, spec, fp), device=device, chunk_size=chunk, **options)
        return engine, [engine.add_plugin(p) for p in plugins[:n]]

    def timm_forward():
        with torch.inference_mode():
            for start in range(0, slices, chunk):
                plain.forward_features(to_model_input(volume[start:start + chunk].to(device)))[:, 0]

    header = (f"## 1. {name}: {slices} slices of {size}^2, chunk {chunk}, attention heatmap, median of {repeats}")
    print(header, flush=True)
    rows = []

    def row(label, seconds):
        rows.append((label, seconds))
        base = rows[0][1]
        print(f"  {label:24s} {seconds * 1000:9.1f} ms/volume   time ratio to timm eager {seconds / base:5.2f}", flush=True)

    runners = [("timm eager fp32", timm_forward)]
    variants = [("engine (adapters)", {}), ("engine merged", {"merge_lora": True})]
    if compile_row:
        variants.append(("engine merged+compiled", {"merge_lora": True, "compile": True}))
    for label, options in variants:
        engine, (plugin,) = engine_with(**options)
        if options.get("compile"):
            start = time.perf_counter()
            engine.predict_slices([volume], plugin, heatmap="attention")
            print(f"  (compilation, once: {time.perf_counter() - start:.0f} s)", flush=True)
        runners.append((label, lambda e=engine, p=plugin: e.predict_slices([volume], p, heatmap="attention")))
    # Interleaved: every repeat times each variant once, so a machine that slows down mid-run slows all rows alike.
    for _, fn in runners:
        fn()  # warm-up
    times = {label: [] for label, _ in runners}
    for _ in range(repeats):
        for label, fn in runners:
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[label].append(time.perf_counter() - start)
    for label, _ in runners:
        row(label, statistics.median(times[label]))
    if not plugin_rows:
        return []
    out = []
    out.append(f"## 2. {name}: each extra plugin (adapters, not merged; preprocessing shared)")
    engine, names = engine_with(3)
    costs = []
    for n in (1, 2, 3):
        costs.append(_time(lambda: [engine.predict_slices([volume], p, heatmap="attention") for p in names[:n]],
                           device, repeats))
        out.append(f"  {n} plugin(s)  {costs[-1] * 1000:9.1f} ms/volume   ratio to one plugin {costs[-1] / costs[0]:5.2f}")
    out.append(f"  each extra plugin costs {((costs[2] - costs[0]) / 2) / costs[0]:.2f} of one plugin's time "
               "(every plugin has its own LoRA, so the backbone runs again)")
    return out


def _rss_peak_mib() -> float:
    """The process's resident-set high-water mark (VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_rss_worker(name, size, slices, chunk):
    """Run in a fresh process: one prediction; print the resident set before it and its high-water mark during it
    in MiB. Building the models peaks above what a prediction needs, so the mark is reset first (Linux
    ``/proc/self/clear_refs`` 5) to measure the prediction itself."""
    spec = BackboneSpec(name, img_size=size)
    model = make_load_bearing(create_backbone(spec))
    (plugin,) = _plugins(model, spec, 1)
    engine = Engine(LoadedBackbone(make_load_bearing(create_backbone(spec)), spec, plugin.config.backbone_fingerprint),
                    device="cpu", chunk_size=chunk, merge_lora=True)
    name = engine.add_plugin(plugin)
    volume = torch.rand(slices, size, size)
    del model
    import gc
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    before = _rss_peak_mib()
    engine.predict_slices([volume], name, heatmap="attention")
    print(json.dumps({"before": before, "peak": _rss_peak_mib()}))


def memory(name, size, chunk, counts):
    out = [f"## 3. {name}: peak resident memory of a fresh process against slice count (chunk {chunk}, CPU)"]
    first = None
    for n in counts:
        run = subprocess.run([sys.executable, __file__, "--memory-worker", name, str(size), str(n), str(chunk)],
                             capture_output=True, text=True, check=True)
        m = json.loads(run.stdout.strip().splitlines()[-1])
        growth = m["peak"] - m["before"]
        first = first if first is not None else m["peak"]
        input_mib = n * size * size * 4 / 2 ** 20
        out.append(f"  {n:4d} slices  before {m['before']:6.0f} MiB  peak during prediction {m['peak']:6.0f} MiB  "
                   f"peak ratio to {counts[0]} slices {m['peak'] / first:5.2f}   (+{growth:5.0f} MiB, of which the input "
                   f"slices {input_mib:5.1f} MiB)")
    return out


def cli_timing(name, size, slices, repeats):
    """The CLI's wall time split by the arrival of its JSON progress events."""
    out = [f"## 4. CLI `python -m anymc3d predict`, {name}, one {size}x{size}x{slices} CT volume, attention heatmap, "
           f"median of {repeats}"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        spec = BackboneSpec(name, img_size=size)
        model = make_load_bearing(create_backbone(spec))
        save_backbone(model, spec, tmp / "bb.safetensors")
        (plugin,) = _plugins(model, spec, 1)
        save_plugin(tmp / "p.anymc3d", plugin.config, plugin.head, plugin.lora)
        write_image_atomic(make_ct_volume(size=(size, size, slices), spacing=(0.8, 0.8, 2.5), lesion=True, seed=0),
                           tmp / "ct.nii.gz")
        settle = 2 * _import_time() + 2  # long enough for a standby's imports, measured on this machine
        splits, warm = [], []
        for i in range(repeats + 1):
            args = ["predict", str(tmp / "ct.nii.gz"), "--backbone", str(tmp / "bb.safetensors"), "--plugin",
                    str(tmp / "p.anymc3d"), "--device", "cpu", "--heatmap", str(tmp / f"h{i}"), "--json",
                    str(tmp / f"r{i}.json"), "--progress", "json"]
            times, end = _run_cli([sys.executable, "-m", "anymc3d", *args], None)
            if i == 0:
                continue  # the first run warms the file cache
            splits.append({"start-up (imports, backbone, plugin)": times["reading"],
                           "reading + preprocessing": times["encoding"] - times["reading"],
                           "encoding + heatmap": times["writing"] - times["encoding"],
                           "writing (heatmap, record)": end - times["writing"], "total": end})
            # The Slicer module's way: an `anymc3d standby` process started ahead (when the module is opened or
            # after the previous run) is handed the same command line on stdin when Apply is pressed.
            times, end = _run_cli([sys.executable, "-m", "anymc3d", "standby"], json.dumps(args), settle=settle)
            warm.append({"start-up, process kept ready": times["reading"], "total, process kept ready": end})
    for key in splits[0]:
        value = statistics.median(s[key] for s in splits)
        out.append(f"  {key:38s} {value:6.2f} s")
    for key in warm[0]:
        value = statistics.median(s[key] for s in warm)
        out.append(f"  {key:38s} {value:6.2f} s   (from the command line written to stdin)")
    importing = statistics.median(_import_time() for _ in range(3))
    floor = statistics.median(_import_time("torch") for _ in range(3))
    out.append(f"  of the start-up, `import anymc3d.engine` alone: {importing:.2f} s; `import torch` alone: {floor:.2f} s "
               "(the floor any torch process pays here); target for start-up: <= 2 s")
    return out


def _run_cli(cmd, stdin_line, settle=0.0):
    """Run the CLI; the arrival time of each ``--progress json`` event and the end, from the start or (for a
    process kept ready) from the moment the command line is written, ``settle`` seconds after its start."""
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    if stdin_line is not None:
        time.sleep(settle)  # the standby's imports happen while the user is still choosing inputs
    start = time.perf_counter()
    if stdin_line is not None:
        proc.stdin.write(stdin_line + "\n")
    proc.stdin.close()
    times = {}
    for line in proc.stdout:
        event = json.loads(line)
        key = event.get("stage") if event["event"] == "progress" else event["event"]
        times.setdefault(key, time.perf_counter() - start)
    proc.wait()
    return times, time.perf_counter() - start


def _import_time(module="anymc3d.engine"):
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True)
    return time.perf_counter() - start


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-worker":
        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
        _peak_rss_worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu).")
    parser.add_argument("--backbones", nargs="+", default=["dinov2_vits14_reg"],
                        help="Short backbone names (default: dinov2_vits14_reg).")
    parser.add_argument("--slices", type=int, default=64, help="Slices per volume (default: 64).")
    parser.add_argument("--size", type=int, default=224, help="Slice size, a multiple of the patch size (default: 224).")
    parser.add_argument("--chunk-size", type=int, default=16, help="Slices per forward (default: 16).")
    parser.add_argument("--repeats", type=int, default=3, help="Timed repeats, median reported (default: 3).")
    parser.add_argument("--compile", action="store_true", help="Add the torch.compile row (default: off; slow to compile).")
    parser.add_argument("--memory-slices", default="16,64,256", help="Slice counts for the memory rows (default: 16,64,256).")
    parser.add_argument("--skip", default="", help="Comma-separated sections to skip: throughput,plugins,memory,cli (default: none).")
    args = parser.parse_args()
    device = torch.device(args.device)
    skip = set(filter(None, args.skip.split(",")))
    print(f"# anymc3d engine benchmark {datetime.date.today()}  device={device}  torch={torch.__version__}  "
          f"threads={torch.get_num_threads()}  cpus={os.cpu_count()}  cpu={platform.processor() or platform.machine()}"
          + (f"  gpu={torch.cuda.get_device_name()}" if device.type == "cuda" else ""), flush=True)
    for name in args.backbones:
        if "throughput" not in skip:
            print("\n".join(throughput(name, device, args.slices, args.size, args.chunk_size, args.repeats,
                                       args.compile, "plugins" not in skip)), flush=True)  # section 1 prints its rows as they come
        if "memory" not in skip and device.type == "cpu":
            counts = [int(n) for n in args.memory_slices.split(",")]
            print("\n".join(memory(name, args.size, args.chunk_size, counts)), flush=True)
        if "cli" not in skip and device.type == "cpu":
            print("\n".join(cli_timing(name, args.size, args.slices, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
