"""bench/scale.py's report: the rehearsal's results against the issue's targets, and the
projected prep time of real ImageNet on a 16-core machine. Pure formatting and arithmetic."""
from __future__ import annotations

REAL_TRAIN, REAL_VAL = 1_281_167, 50_000
PROJECTED_CORES = 16


def project_seconds(num_images: int, worker_ms: float, main_ms: float, cores: int = PROJECTED_CORES) -> float:
    """Build time on `cores` cores: workers transform in parallel while one main process reads
    and writes every image in order, so the build takes the larger of the CPU work spread over
    all cores and the main process's own sequential work."""
    return num_images * max((worker_ms + main_ms) / cores, main_ms) / 1e3


def _gib(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:.2f} GiB"


def _prep_lines(prep: dict) -> list[str]:
    lines = []
    for split in ("train", "val", "val 160+320"):
        r = prep.get(split)
        if not r or "members" not in r:
            continue
        tenths = r.get("img_per_s_by_tenth", [])
        lines += [
            f"prep {split}: {r['members']:,} members -> {r['records']:,} records ({r['rejects']} rejected, "
            f"{r['conversions']:,} converted, {r['stored_as_is']:,} stored as is) in {r['wall_s']:.0f} s wall, "
            f"{r['tool_img_per_s']:,} img/s with {r['workers']} workers; {_gib(r['dataset_bytes'])}",
            f"  img/s by tenth of the members: {', '.join(f'{x:,.0f}' for x in tenths)}",
            "  CPU ms per image by tenth, main process | whole tree: " + ", ".join(
                f"{t['main_cpu_ms']:.3f}|{t['tree_cpu_ms']:.2f}" for t in r.get("tenths", [])),
            "  cores busy by tenth, the build | everyone else: " + ", ".join(
                f"{t['tree_cpu_share']:.2f}|{t.get('others_cpu_share', float('nan')):.2f}" for t in r.get("tenths", []))
            + "; iowait: " + ", ".join(f"{t.get('iowait_share', float('nan')):.2f}" for t in r.get("tenths", []))
            + "; machine's available memory (GiB): " + ", ".join(f"{t['available_mib'] / 1024:.1f}" for t in r.get("tenths", [])),
            f"  last tenth / first tenth: {r.get('last_vs_first_tenth', float('nan')):.2f} (target >= 0.90)",
            f"  peak RSS of the process tree: {r['peak_rss_mib']:,.0f} MiB (target < 1024); peak open files "
            f"{r['peak_fds']}; {r['peak_processes']} processes",
            f"  main process CPU per image while streaming: {r.get('main_cpu_ms_per_image', float('nan')):.3f} ms; "
            f"start-up {r.get('started_streaming_at_s', 0):.1f} s, finalize {r.get('after_last_member_s', 0):.1f} s",
        ]
    return lines


PER_CORE_CONFIGS = {"sz/160": "prep 160 w1", "sz/320": "prep 320 w1", "sz/160 + sz/320 in one pass": "prep 160+320 w1"}


def _main_ms(build: dict) -> float | None:
    """The main process's CPU ms per image: the median over the build's tenths (one odd tenth,
    a start-up or a stall, does not move it), else the whole build's mean."""
    tenths = sorted(t["main_cpu_ms"] for t in build.get("tenths", []))
    if tenths:
        return (tenths[(len(tenths) - 1) // 2] + tenths[len(tenths) // 2]) / 2
    return build.get("main_cpu_ms_per_image")


def _projection_lines(results: dict, prep_bench: dict) -> list[str]:
    """Real ImageNet on 16 cores from bench/prep.py's one-worker rates on real photos (median over
    its repeats) and the rehearsal's main-process cost per image, with one and two outputs."""
    prep = results.get("prep", {})
    main_one, main_two = _main_ms(prep.get("train", {})), _main_ms(prep.get("val 160+320", {}))
    runs = prep_bench.get("img_per_s_runs", [])
    if main_one is None or not runs:
        return []
    lines = [f"projected prep of real ImageNet ({REAL_TRAIN:,} train + {REAL_VAL:,} val) on {PROJECTED_CORES} cores "
             f"like these: per-core rates from bench/prep.py (median of {len(runs)} repeats), main process "
             f"{main_one:.3f} ms/img with one output, {main_two or main_one:.3f} with two (median of the tenths)"]
    for name, key in PER_CORE_CONFIGS.items():
        if key not in runs[0]:
            continue
        rate = sorted(run[key] for run in runs)[len(runs) // 2]
        main_ms = main_two if "one pass" in name and main_two else main_one
        train_s, val_s = project_seconds(REAL_TRAIN, 1e3 / rate, main_ms), project_seconds(REAL_VAL, 1e3 / rate, main_ms)
        bound = "main process" if main_ms > (1e3 / rate + main_ms) / PROJECTED_CORES else "cores"
        lines.append(f"  {name:<28} {rate:6.0f} img/s per core -> train {train_s / 60:5.1f} min + val {val_s:4.0f} s "
                     f"(bound by the {bound})")
    return lines


def format_report(results: dict, prep_bench: dict | None = None) -> str:
    lines = [f"machine: {results.get('machine')}"]
    gen = results.get("generate")
    if gen:
        lines.append(f"archive: {gen['train_images']:,} train ({gen['num_classes']} class tars, {gen['train_per_class'][0]}-"
                     f"{gen['train_per_class'][1]} per class) + {gen['val_images']:,} val members; "
                     f"{gen['train_cmyk']} CMYK, {gen['train_png']} PNG, {gen['train_gray']:,}+{gen['val_gray']:,} gray; "
                     f"mean image {gen['mean_train_image_bytes'] / 1024:.1f} KiB; "
                     + ", ".join(f"{k} {_gib(v)}" for k, v in gen["bytes"].items()) + f"; generated in {gen['seconds']:.0f} s")
    lines += _prep_lines(results.get("prep", {}))
    profile = results.get("profile")
    if profile:
        lines.append(f"profile of the main process, one part ({profile['members']:,} members, "
                     f"{_gib(profile['part_bytes'])} of {_gib(profile['source_bytes'])}): top functions by own time, "
                     "us per member")
        lines += [f"  {row['us_per_member']:8.2f}  {row['calls']:>9,}  {row['function']}" for row in profile["top_tottime"][:15]]
    for split, r in results.get("verify", {}).items():
        lines.append(f"verify {split} --source: {r['records']:,} records in {r['tool_seconds']:.0f} s "
                     f"({r['records'] / max(r['tool_seconds'], 1e-9):,.0f}/s), {'OK' if r['ok'] else 'FAULTS'}; "
                     f"peak RSS {r['peak_rss_mib']:,.0f} MiB")
    train = results.get("train")
    if train:
        lines += [
            f"dataset open (manifest + records.npy + store check), {train['num_train_records']:,} records: "
            f"{1e3 * train['dataset_open_s']:.1f} ms (manifest alone {1e3 * train['manifest_read_s']:.1f} ms; target < 1 s)",
            "epoch sampler plan, one rank: " + ", ".join(f"{w} ranks {1e3 * s:.1f} ms" for w, s in sorted(train["sampler_plan_s"].items(), key=lambda kv: int(kv[0])))
            + " (target < 1 s)",
            f"rect-val batches of {train['num_val_records']:,}: " + ", ".join(
                f"{w} ranks {1e3 * s:.1f} ms" for w, s in train["rect_val_batches_s"].items())
            + f"; ValLoader(rect) construction {1e3 * train['rect_val_loader_construct_s']:.1f} ms",
            f"loader epoch start: TrainLoader built in {1e3 * train['train_loader']['construct_s']:.0f} ms, "
            f"first batch {train['train_loader']['first_batch_s']:.2f} s later",
            f"train run --dry-run: {train['dry_run_s']:.2f} s (target < 5 s); `train --help` alone "
            f"{train['python_and_imports_s']:.2f} s, `import train.run.main` alone {train.get('train_run_imports_s', float('nan')):.2f} s",
        ]
    parts = results.get("parts")
    if parts:
        lines.append(f"2-rank torchrun build + merge: {parts['wall_s']:.0f} s wall vs single build {parts['single_build_wall_s']:.0f} s; "
                     f"merge {parts['merge_s']:.1f} s = {parts['merge_s'] / parts['single_build_wall_s']:.1%} of the single build "
                     f"(target < 10%); identical to the single build: {all(parts['identical_files'].values())} "
                     f"({', '.join(parts['identical_files'])}); prep verify: {'OK' if parts['verify_ok'] else 'FAULTS'}")
        if parts.get("img_per_s_by_tenth"):
            lines.append("  both ranks' img/s by tenth: " + ", ".join(f"{x:,.0f}" for x in parts["img_per_s_by_tenth"])
                         + "; tree CPU ms per image: " + ", ".join(f"{t['tree_cpu_ms']:.2f}" for t in parts["tenths"]))
    lines += _projection_lines(results, prep_bench or {})
    return "\n".join(lines)
