"""Engine speed and memory, every number measured in this one run (not a timed test).

1. Throughput on the same preprocessed slices (ViT-S/14 at 224^2, 64 slices by default), interleaved:
     timm eager fp32      plain eager ``forward_features`` in chunks (no LoRA, no pooling): the reference;
     timm eager bf16      the same model converted with ``.to(torch.bfloat16)``, bf16 inputs;
     timm autocast bf16   the fp32 model under ``torch.autocast("cpu", torch.bfloat16)`` (the other bf16 form);
     engine bf16          ``Engine.predict_slices`` with one plugin and the paper's attention heatmap, the default
                          path: LoRA folded into a bf16 copy of the weights (``precision="bf16"``);
     engine fp32          the same in fp32; ``engine fp32 adapters``: LoRA as adapter layers (``--no-merge-lora``);
     engine bf16 compiled the bf16 engine through ``torch.compile`` (``--compile``);
     timm int8 dynamic    (``--int8``) the fp32 model with ``torch.ao.quantization.quantize_dynamic`` on its Linear
                          layers, with its CLS cosine to fp32: measured, not shipped;
   each as a time ratio to the fp32 timm row, and the bf16 engine to the bf16 timm row.
2. Each extra plugin's cost: one case through 1, 2 and 3 plugins (their own LoRA, shared preprocessing).
3. Peak memory (resident set of a fresh process) against slice count at a fixed chunk, in bf16 and fp32.
4. The CLI, as the Slicer module runs it: time from process start to the record written for one volume, split
   into start-up (interpreter, imports, backbone and plugin load), reading + preprocessing, encoding (with
   the heatmap) and writing, from the arrival times of its ``--progress json`` events.

    python benchmarks/bench_engine.py                 # CPU; add --compile for the compiled row (minutes to compile)
    python benchmarks/bench_engine.py --skip plugins,memory,cli --int8   # the precision rows only
    python benchmarks/bench_engine.py --device cuda --backbones dinov2_vitl14_reg --slices 256
"""
from __future__ import annotations

import argparse
import copy
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


def machine_line() -> str:
    """CPU model (lscpu), its bf16/int8 matrix flags, what precision "auto" picks, and the load: for saved output."""
    from anymc3d.device import native_bf16, precision_name, resolve_precision

    model = next((line.split(":", 1)[1].strip() for line in
                  subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
                  if line.startswith("Model name")), platform.processor())
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    wanted = [f for f in ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni") if f in flags]
    cpu = torch.device("cpu")
    return (f"CPU {model}; flags {' '.join(wanted) or 'none of amx/avx512_bf16'}; native bf16 on cpu: "
            f"{native_bf16(cpu)}; auto picks {precision_name(resolve_precision('auto', cpu))}; "
            f"load average {os.getloadavg()} "
            "(the machine is shared: ratios come from interleaved timings)")


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


# radon cc 21: one interleaved timing loop over every variant row, so the rows share their repeats
def throughput(name, device, slices, size, chunk, repeats, compile_row, plugin_rows=True, int8_row=False, drop=()):
    spec = BackboneSpec(name, img_size=size)
    model = make_load_bearing(create_backbone(spec))
    plugins = _plugins(model, spec, 3)
    plain = make_load_bearing(create_backbone(spec)).to(device)  # same weights, no adapters
    plain_bf16 = copy.deepcopy(plain).to(torch.bfloat16)
    fp = plugins[0].config.backbone_fingerprint
    volume = torch.rand(slices, size, size)

    def engine_with(n=1, **options):
        bb = make_load_bearing(create_backbone(spec))
        engine = Engine(LoadedBackbone(bb, spec, fp), device=device, chunk_size=chunk, **options)
        return engine, [engine.add_plugin(p) for p in plugins[:n]]

    def timm_forward(net=plain, dtype=torch.float32, autocast=False):
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            return torch.cat([net.forward_features(to_model_input(volume[start:start + chunk].to(device)).to(dtype))[:, 0]
                              for start in range(0, slices, chunk)]).float()

    header = (f"## 1. {name}: {slices} slices of {size}^2, chunk {chunk}, attention heatmap, median of {repeats}, "
              "interleaved")
    print(header, flush=True)
    runners = [("timm eager fp32", timm_forward),
               ("timm eager bf16", lambda: timm_forward(plain_bf16, torch.bfloat16)),
               ("timm autocast bf16", lambda: timm_forward(autocast=True))]
    variants = [("engine bf16", {"precision": "bf16"}), ("engine fp32", {"precision": "fp32"}),
                ("engine fp32 adapters", {"precision": "fp32", "merge_lora": False})]
    if compile_row:
        variants.append(("engine bf16 compiled", {"precision": "bf16", "compile": True}))
    runners = [r for r in runners if r[0] not in drop]
    for label, options in [v for v in variants if v[0] not in drop]:
        engine, (plugin,) = engine_with(**options)
        if options.get("compile"):
            start = time.perf_counter()
            engine.predict_slices([volume], plugin, heatmap="attention")
            print(f"  (compilation, once: {time.perf_counter() - start:.0f} s)", flush=True)
        runners.append((label, lambda e=engine, p=plugin: e.predict_slices([volume], p, heatmap="attention")))
    if int8_row:
        int8 = torch.ao.quantization.quantize_dynamic(copy.deepcopy(plain), {torch.nn.Linear}, dtype=torch.qint8)
        runners.append(("timm int8 dynamic", lambda: timm_forward(int8)))
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
    median = {label: statistics.median(t) for label, t in times.items()}
    base, base_bf16 = median["timm eager fp32"], median["timm eager bf16"]
    for label, _ in runners:
        extra = f"   to timm eager bf16 {median[label] / base_bf16:5.2f}" if label.startswith("engine bf16") else ""
        print(f"  {label:24s} {median[label] * 1000:9.1f} ms/volume   time ratio to timm eager fp32 "
              f"{median[label] / base:5.2f}   speed-up {base / median[label]:5.2f}x{extra}", flush=True)
    reference = timm_forward()
    for label, net, dtype in [("timm eager bf16", plain_bf16, torch.bfloat16)] + (
            [("timm int8 dynamic", int8, torch.float32)] if int8_row else []):
        cos = torch.nn.functional.cosine_similarity(timm_forward(net, dtype), reference, dim=-1)
        print(f"  {label}: CLS cosine to fp32, min over slices {cos.min():.5f} (random load-bearing weights)", flush=True)
    if not plugin_rows:
        return []
    out = []
    out.append(f"## 2. {name}: each extra plugin (default precision and merging; preprocessing shared)")
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


def _peak_rss_worker(name, size, slices, chunk, precision="fp32"):
    """Run in a fresh process: one prediction; print the resident set before it and its high-water mark during it
    in MiB. Building the models peaks above what a prediction needs, so the mark is reset first (Linux
    ``/proc/self/clear_refs`` 5) to measure the prediction itself."""
    spec = BackboneSpec(name, img_size=size)
    model = make_load_bearing(create_backbone(spec))
    (plugin,) = _plugins(model, spec, 1)
    engine = Engine(LoadedBackbone(make_load_bearing(create_backbone(spec)), spec, plugin.config.backbone_fingerprint),
                    device="cpu", chunk_size=chunk, merge_lora=True, precision=precision)
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
    for precision in ("bf16", "fp32"):
        first = None
        for n in counts:
            run = subprocess.run([sys.executable, __file__, "--memory-worker", name, str(size), str(n), str(chunk),
                                  precision], capture_output=True, text=True, check=True)
            m = json.loads(run.stdout.strip().splitlines()[-1])
            growth = m["peak"] - m["before"]
            first = first if first is not None else m["peak"]
            input_mib = n * size * size * 4 / 2 ** 20
            out.append(f"  {precision} {n:4d} slices  before {m['before']:6.0f} MiB  peak during prediction "
                       f"{m['peak']:6.0f} MiB  peak ratio to {counts[0]} slices {m['peak'] / first:5.2f}   "
                       f"(+{growth:5.0f} MiB, of which the input slices {input_mib:5.1f} MiB)")
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
                           "writing (heatmap, record)": times["last event"] - times["writing"],
                           "exit (interpreter shutdown)": end - times["last event"], "total": end})
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
    importing = statistics.median(_import_time(teardown=False) for _ in range(3))
    floor = statistics.median(_import_time("torch") for _ in range(3))
    bare = statistics.median(_import_time("torch", teardown=False) for _ in range(3))
    timm_cost = statistics.median(_import_time("torch, timm", teardown=False) for _ in range(3)) - bare
    vision = statistics.median(_import_time("torch, torchvision.ops", teardown=False) for _ in range(3)) - bare
    out.append(f"  `python -c \"import torch\"`: {floor:.2f} s, of which the interpreter's teardown {floor - bare:.2f} s "
               f"(the CLI skips it); `import anymc3d.engine` without teardown: {importing:.2f} s")
    out.append(f"  `import timm` after torch: {timm_cost:.2f} s, of which torchvision.ops (+ torch._dynamo, imported by "
               f"timm/layers/create_norm.py unconditionally) about {vision:.2f} s")
    total = statistics.median(s["total"] for s in splits)
    encoding = statistics.median(s["encoding + heatmap"] for s in splits)
    out.append(f"  beyond `python -c \"import torch\"` and the forward (encoding + heatmap): {total - floor - encoding:.2f} s "
               "(target <= 1.5 s)")
    out.append(f"  beyond torch's import alone and the forward: {total - bare - encoding:.2f} s; of it `import timm` "
               f"{timm_cost:.2f} s (timm 1.0.31 imports every model file and torchvision.ops unconditionally), the rest "
               f"(anymc3d, SimpleITK, nibabel, loading, reading, writing, exit) {total - bare - encoding - timm_cost:.2f} s")
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
        times["last event"] = time.perf_counter() - start
    proc.wait()
    return times, time.perf_counter() - start


def _import_time(module="anymc3d.engine", teardown=True):
    """Wall time of ``python -c "import MODULE"``; without ``teardown`` the process ends with ``os._exit`` as the CLI
    does, so the interpreter's module teardown is not counted."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {module}" + ("" if teardown else "; import os; os._exit(0)")],
                   check=True)
    return time.perf_counter() - start


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-worker":
        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
        _peak_rss_worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
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
    parser.add_argument("--drop", default="", help="Comma-separated rows of section 1 to leave out, e.g. 'engine fp32 "
                        "adapters,timm autocast bf16' (default: none; the fp32 and bf16 timm rows are always run).")
    parser.add_argument("--int8", action="store_true", help="Add the int8 dynamic-quantisation row (default: off).")
    parser.add_argument("--memory-slices", default="16,64,256", help="Slice counts for the memory rows (default: 16,64,256).")
    parser.add_argument("--skip", default="", help="Comma-separated sections to skip: throughput,plugins,memory,cli (default: none).")
    args = parser.parse_args()
    device = torch.device(args.device)
    skip = set(filter(None, args.skip.split(",")))
    print(f"# anymc3d engine benchmark {datetime.date.today()}  device={device}  torch={torch.__version__}  "
          f"threads={torch.get_num_threads()}  cpus={os.cpu_count()}  cpu={platform.processor() or platform.machine()}"
          + (f"  gpu={torch.cuda.get_device_name()}" if device.type == "cuda" else ""), flush=True)
    print(f"# command: python {' '.join(sys.argv)}\n# {machine_line()}", flush=True)
    for name in args.backbones:
        if "throughput" not in skip:
            print("\n".join(throughput(name, device, args.slices, args.size, args.chunk_size, args.repeats,
                                       args.compile, "plugins" not in skip, args.int8,
                                       set(filter(None, args.drop.split(","))) - {"timm eager fp32", "timm eager bf16"})),
                  flush=True)  # section 1 prints its rows as they come
        if "memory" not in skip and device.type == "cpu":
            counts = [int(n) for n in args.memory_slices.split(",")]
            print("\n".join(memory(name, args.size, args.chunk_size, counts)), flush=True)
        if "cli" not in skip and device.type == "cpu":
            print("\n".join(cli_timing(name, args.size, args.slices, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
