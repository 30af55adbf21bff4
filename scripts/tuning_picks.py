"""Record, or pin, the launch configurations Triton's autotuner picks, around any tachylm command.

Usage:
    PYTHONPATH=src python3 scripts/tuning_picks.py --dump picks.json -- bench --shape llama-2-7b
    PYTHONPATH=src python3 scripts/tuning_picks.py --pin picks.json -- bench --shape llama-2-7b

The GEMV and MLP kernels are tuned by timing each candidate alone, from an emptied
L2 (`quant_matmul._tuning_bench`), once per machine (the picks go to the Triton cache). Candidates
within the timing's noise of each other can then be picked differently on two machines, and
what is equal alone need not be equal between the step's other kernels. This script shows it:

--dump FILE  writes, for every autotuned kernel the command ran, each key (the shapes, flags and
             dtypes it is tuned for), the config picked and, where this process timed the
             candidates (not a Triton-cache hit), every candidate's time in milliseconds.
--pin FILE   makes the autotuners take the picks in FILE (a --dump from another machine or run)
             instead of timing or reading the cache; picks for kernels the command never made are
             listed at the end.

Both may be given (pin some picks, dump all). Everything after `--` is a tachylm command line.
"""
import argparse
import json
import sys

import torch
import triton
from triton.runtime.autotuner import Autotuner

FORMAT = 1


def config_dict(config: triton.Config) -> dict:
    """A config as plain JSON values (what `--dump` writes and `--pin` matches)."""
    return {"kwargs": dict(config.kwargs), "num_warps": config.num_warps,
            "num_stages": config.num_stages, "num_ctas": config.num_ctas,
            "maxnreg": config.maxnreg}


def kernel_name(tuner: Autotuner) -> str:
    return tuner.base_fn.__name__


class Picks:
    """Watches every Autotuner made after `install`: applies pins as each is made, and keeps
    the candidates' times each one measures, per key."""

    def __init__(self, pins: dict | None = None):
        # kernel name -> key tuple -> triton.Config (`read_pins`)
        self.pins = {name: dict(by_key) for name, by_key in (pins or {}).items()}
        self.pinned: set[tuple[str, tuple]] = set()
        self.tuners: list[Autotuner] = []
        self.timings: dict[tuple[int, tuple], list] = {}

    def install(self) -> None:
        """Patch `Autotuner` (for the rest of the process): every autotuner made from now on is
        kept and pinned, and its timings are recorded."""
        picks, init, run = self, Autotuner.__init__, Autotuner.run

        def watched_init(tuner, *args, **kwargs):
            init(tuner, *args, **kwargs)
            picks.adopt(tuner)

        def watched_run(tuner, *args, **kwargs):
            before = getattr(tuner, "configs_timings", None)
            known = set(tuner.cache)
            try:
                return run(tuner, *args, **kwargs)
            finally:
                timings = getattr(tuner, "configs_timings", None)
                if timings is not None and timings is not before:  # this run timed candidates
                    ranked = sorted(([config_dict(c), _floats(t)] for c, t in timings.items()),
                                    key=lambda item: item[1][0])
                    for key in set(tuner.cache) - known:
                        picks.timings[(id(tuner), key)] = ranked
        Autotuner.__init__, Autotuner.run = watched_init, watched_run

    def adopt(self, tuner: Autotuner) -> None:
        """Keep `tuner` and give it its kernel's pins. The config is built from the pin, not
        looked up among the tuner's base configs: the GEMVs' candidates are made when they are
        tuned (`quant_matmul._prune` sets SPLIT_K per shape)."""
        self.tuners.append(tuner)
        name = kernel_name(tuner)
        for key, config in self.pins.get(name, {}).items():
            tuner.cache[key] = config
            self.pinned.add((name, key))

    def unused_pins(self) -> list[tuple[str, tuple]]:
        return [(name, key) for name, by_key in self.pins.items() for key in by_key
                if (name, key) not in self.pinned]

    def records(self) -> list[dict]:
        """One record per (kernel, key) an autotuner holds a pick for."""
        out = []
        for tuner in self.tuners:
            for key, config in tuner.cache.items():
                out.append({"kernel": kernel_name(tuner), "key": list(key),
                            "config": config_dict(config),
                            "pinned": (kernel_name(tuner), key) in self.pinned,
                            "timings_ms": self.timings.get((id(tuner), key))})
        return out


def _floats(timing) -> list[float]:
    return [float(t) for t in (timing if isinstance(timing, (list, tuple)) else [timing])]


def make_config(d: dict) -> triton.Config:
    """The triton.Config a `config_dict` describes (ValueError if it is not one)."""
    try:
        if not isinstance(d["kwargs"], dict):
            raise TypeError("kwargs is not an object")
        return triton.Config(dict(d["kwargs"]), num_warps=int(d["num_warps"]),
                             num_stages=int(d["num_stages"]), num_ctas=int(d.get("num_ctas", 1)),
                             maxnreg=d.get("maxnreg"))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"not a config ({type(e).__name__}: {e})") from e


def read_pins(path: str) -> dict:
    """kernel name -> [(key tuple, triton.Config)] from a --dump file; ValueError names what is
    wrong."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--pin {path}: cannot read it ({e}); give a file --dump wrote") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(
            data.get("picks"), list):
        raise ValueError(f"--pin {path}: not a tuning_picks --dump file (format {FORMAT})")
    pins: dict = {}
    for i, record in enumerate(data["picks"]):
        if not (isinstance(record, dict) and isinstance(record.get("kernel"), str)
                and isinstance(record.get("key"), list) and isinstance(record.get("config"), dict)):
            raise ValueError(f"--pin {path}: pick {i} lacks kernel, key or config")
        try:
            config = make_config(record["config"])
        except ValueError as e:
            raise ValueError(f"--pin {path}: pick {i}: {e}") from e
        pins.setdefault(record["kernel"], []).append((tuple(record["key"]), config))
    return pins


def write_dump(path: str, picks: Picks, command: list[str]) -> None:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    data = {"format": FORMAT, "device": device, "torch": torch.__version__,
            "triton": triton.__version__, "command": command, "picks": picks.records()}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.write("\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dump", metavar="FILE", help="write every pick the command made")
    parser.add_argument("--pin", metavar="FILE", help="take the picks of a --dump file")
    args = parser.parse_args(argv[:split])
    command = argv[split + 1:]
    if not command or not (args.dump or args.pin):
        parser.error("give --dump FILE and/or --pin FILE, then -- and a tachylm command")
    try:
        picks = Picks(read_pins(args.pin) if args.pin else None)
    except ValueError as e:
        parser.error(str(e))
    picks.install()
    from tachylm.cli import main as tachylm_main  # after install: no autotuner is missed

    try:
        code = tachylm_main(command)
    finally:
        if args.dump:
            write_dump(args.dump, picks, command)
            print(f"[tuning_picks] {len(picks.records())} picks written to {args.dump}",
                  file=sys.stderr)
        for name, key in picks.unused_pins():
            print(f"[tuning_picks] pin not used: {name} {list(key)}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
