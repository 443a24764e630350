"""Whether a run folder is intact: ``python -m common.verify runs/<run>`` (``make verify``).

A run folder is a set of files bound to each other by recorded hashes:

* the baseline: released weights (``baseline/model.json`` records their path and SHA-256) or the run's own
  ``baseline/checkpoint.pt``; ``fisher.pt``, ``importance/*.pt`` and the W/A caches record that SHA-256;
  ``snapshots/index.json`` the SHA-256 of every EMA snapshot; ``model.json`` its sample grid's;
* every variant (a folder with ``metrics.json``, in the run or in a sub-run such as ``compare/``,
  ``act_quant/`` or ``sensitivity/<snapshot>/``): see ``common.evaluation.integrity``; its quantized file
  also names the Fisher it was planned with, checked against the nearest ``baseline/fisher.pt``;
* summaries and plots: ``<name>.sources.json`` records their SHA-256 and those of the files they were made from;
* ``sample.py`` outputs: ``sample.json`` records the source file and its outputs;
* ``w4a4.py``'s ablation rows: ``selection.json`` records the variant's files and the baseline it measured.

``verify_run`` reads everything with safetensors, ``weights_only`` torch loads and JSON only, never writes,
and returns one ``Finding`` per file: OK, MISMATCH (a hash or cross-reference that does not hold, or a file
that does not read), MISSING (recorded but absent) or UNREFERENCED (present, but no record accounts for it:
e.g. a killed writer's temp file or an old container).
"""
import argparse
import glob
import json
import os
import sys

from ..core import storage
from ..diffusion.baseline import BaselineError, read_metadata
from ..evaluation.integrity import (
    MISMATCH,
    MISSING,
    OK,
    SELECTION_FILES,
    UNREFERENCED,
    Finding,
    check_variant,
    file_check,
    sealed,
)
from ..quant.activations import load_act_quant, quantizer_digest
from ..quant.container import META_KEY, QuantizedFileError, read_quantized

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IGNORED = (".lock",)  # lock files hold no data (common.core.lock)
FISHER_KEYS = ("checkpoint_sha256", "config", "n_samples")  # what decides the Fisher values a plan used


def _load(path, kind):
    """(content, None) or (None, Finding) for a JSON or torch file that does not read, is not one of ours (not a
    mapping) or whose contents no longer match the digest it carries."""
    try:
        obj = storage.load_json(path) if kind == "json" else storage.load_torch(path)
    except (storage.CorruptFileError, FileNotFoundError) as e:
        return None, Finding(path, [], MISMATCH, str(e))
    if not isinstance(obj, dict):
        return None, Finding(path, [], MISMATCH, f"not one of our artifacts (a {type(obj).__name__})")
    if kind == "torch" and storage.content_ok(obj) is False:
        return None, Finding(path, [], MISMATCH, "its contents do not match their digest (damaged)")
    if kind == "torch" and "meta" in obj and not isinstance(obj["meta"], dict):
        return None, Finding(path, [], MISMATCH, "not one of our artifacts (its meta is not a record)")
    return obj, None


class RunVerifier:
    def __init__(self, run: str):
        self.run = os.path.abspath(run)
        self.findings = []
        self.identities = {}  # run folder -> (SHA-256 of its baseline weights, the file that says so)

    # ------------------------------------------------------------------ baseline identity
    def identity(self, folder: str):
        """(SHA-256, source) of the baseline weights that govern ``folder``: its own ``baseline/`` if that holds
        weights (model.json of released weights, or checkpoint.pt), else its parent's, up to the run."""
        folder = os.path.abspath(folder)
        if folder in self.identities:
            return self.identities[folder]
        base = os.path.join(folder, "baseline")
        ident = None
        info = os.path.join(base, "model.json")
        ckpt = os.path.join(base, "checkpoint.pt")
        if os.path.isfile(info):
            m, _ = _load(info, "json")
            if m and m.get("sha256"):  # released weights (with "source") or the run's checkpoint.pt
                ident = (m["sha256"], m.get("source") or ckpt)
        if ident is None and os.path.isfile(ckpt):
            ident = (storage.sha256_file(ckpt), ckpt)
        if ident is None and folder != self.run and folder.startswith(self.run):
            ident = self.identity(os.path.dirname(folder))
        self.identities[folder] = ident
        return ident

    def nearest(self, folder: str, rel: str):
        """The nearest ``<ancestor>/baseline/<rel>`` from ``folder`` up to the run, or None."""
        folder = os.path.abspath(folder)
        while folder.startswith(self.run):
            p = os.path.join(folder, "baseline", rel)
            if os.path.exists(p):
                return p
            if folder == self.run:
                break
            folder = os.path.dirname(folder)
        return None

    # ------------------------------------------------------------------ checks
    def add(self, *found):
        self.findings += [f for f in found if f is not None]

    def check_baseline(self, base: str):
        folder = os.path.dirname(base)
        ident = self.identity(folder)
        info, ckpt = os.path.join(base, "model.json"), os.path.join(base, "checkpoint.pt")
        if os.path.isfile(info):
            m, bad = _load(info, "json")
            self.add(bad)
            if m is not None:
                row = sealed(Finding(info, [m.get("source") or ckpt]), m)
                self.add(row)
                if not m.get("files") and row.status == OK:
                    row.status, row.detail = MISMATCH, "records no sample grid hash"
                for name, sha in (m.get("files") or {}).items():
                    self.add(file_check(os.path.join(base, name), sha, info))
                if m.get("source"):
                    self.add(self.check_released(m, info))
                elif m.get("sha256"):
                    self.add(file_check(ckpt, m["sha256"], info))
        fingerprint = None
        if os.path.isfile(ckpt):
            c, bad = _load(ckpt, "torch")
            self.add(bad or Finding(ckpt, [], OK if c.get("finished") else MISMATCH,
                                    "" if c.get("finished") else f"unfinished (step {c.get('step')})"))
            fingerprint = c.get("fingerprint") if c else None
        for path in sorted(glob.glob(os.path.join(base, "**", "*"), recursive=True)):
            name = os.path.basename(path)
            if os.path.isdir(path) or name in IGNORED or path in (info, ckpt):
                continue
            if "snapshots" in os.path.relpath(path, base).split(os.sep):
                continue
            if name.endswith(".pt"):
                self.add(self.check_bound_artifact(path, ident))
            elif name.endswith(".safetensors"):
                self.add(self.check_cache_safetensors(path, ident))
            elif name.endswith(".json"):
                self.add(self.check_cache_json(path, ident))
        self.check_snapshots(os.path.join(base, "snapshots"), fingerprint)

    def check_released(self, m: dict, info: str) -> Finding:
        src = m["source"]
        path = src if os.path.isabs(src) or os.path.exists(src) else os.path.join(REPO, src)
        f = file_check(path, m["sha256"], info)
        if f.status == OK:
            try:
                read_metadata(path)
            except BaselineError as e:
                f.status, f.detail = MISMATCH, str(e)
        return f

    def check_bound_artifact(self, path: str, ident) -> Finding:
        """fisher.pt, importance/*.pt, fisher_all_weights.pt: record the SHA-256 of the weights they came from."""
        art, bad = _load(path, "torch")
        if bad:
            return bad
        have = (art.get("meta") or {}).get("checkpoint_sha256") if isinstance(art, dict) else None
        return self._against(path, have, ident)

    def _against(self, path, have, ident) -> Finding:
        if ident is None:
            return Finding(path, ["baseline weights"], MISSING, "no baseline weights in this run to check it against")
        if have is None:
            return Finding(path, [ident[1]], MISMATCH, "names no baseline weights (a cache written before caches "
                                                       "named them?): delete it, the next run recomputes it")
        if have != ident[0]:
            return Finding(path, [ident[1]], MISMATCH, f"computed from weights {str(have)[:12]}..., the run's baseline "
                                                       f"is {ident[0][:12]}...")
        return Finding(path, [ident[1]])

    def check_cache_safetensors(self, path: str, ident) -> Finding:
        """Calibrated ranges (metadata ``inputs``) or a quantized container of cached formats (provenance
        ``inputs``): readable, and made from the run's baseline weights."""
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as fh:
                meta = fh.metadata() or {}
            if META_KEY in meta:
                have = (read_quantized(path)["provenance"].get("inputs") or {}).get("checkpoint_sha256")
            elif "act_format" in meta:  # learned activation steps (w4a4's distillation): bound through its .pt
                bad, have = self._act_against_artifact(path)
                if bad:
                    return bad
            else:
                with safe_open(path, framework="pt") as fh:
                    tensors = {k: fh.get_tensor(k) for k in fh.keys()}
                if storage.tensors_seal_ok(meta, tensors) is False:
                    return Finding(path, [], MISMATCH, "its tensors do not match the digest it was written with "
                                                       "(edited or damaged)")
                have = json.loads(meta.get("inputs", "{}")).get("checkpoint_sha256")
        except Exception as e:  # safetensors raises its own error types for damaged files
            return Finding(path, [], MISMATCH, f"unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
        return self._against(path, have, ident)

    @staticmethod
    def _act_against_artifact(path: str):
        """A cache ``<name>_act.safetensors`` whose ``<name>.pt`` records its quantizer's digest (``q_digest``) and
        the checkpoint: (a MISMATCH if there is no such .pt or the two disagree, either edited or replaced, else
        None; the checkpoint SHA-256 the .pt is bound to)."""
        art_path = path.removesuffix("_act.safetensors") + ".pt"
        art, bad = _load(art_path, "torch") if os.path.isfile(art_path) else (None, None)
        if bad:
            return None, None  # the .pt's own row says why; this file then names no weights
        if not isinstance(art, dict) or "q_digest" not in art:
            return Finding(path, [art_path], MISMATCH, f"no {os.path.basename(art_path)} records these steps "
                                                       f"(left behind?): delete it"), None
        if quantizer_digest(load_act_quant(path)[0]) != art["q_digest"]:
            return Finding(path, [art_path], MISMATCH, f"its steps are not the ones {os.path.basename(art_path)} "
                                                       f"records (edited or replaced)"), None
        return None, (art.get("meta") or {}).get("checkpoint_sha256")

    def check_cache_json(self, path: str, ident) -> Finding:
        """A sealed JSON cache (activation importance, measured configurations) naming the baseline weights."""
        art, bad = _load(path, "json")
        if bad:
            return bad
        inputs = art.get("inputs") or {}
        have = inputs.get("checkpoint_sha256") or (inputs.get("ranges") or {}).get("checkpoint_sha256")
        return sealed(self._against(path, have, ident), art)

    def check_snapshots(self, folder: str, fingerprint):
        files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
        index_path = os.path.join(folder, "index.json")
        index = {}
        if os.path.isfile(index_path):
            record, bad = _load(index_path, "json")
            self.add(bad or sealed(Finding(index_path, []), record))
            index = (record or {}).get("files", {})
        for name, sha in index.items():
            self.add(file_check(os.path.join(folder, name), sha, index_path))
        for path in files:
            if os.path.basename(path) in index:
                f = next(f for f in reversed(self.findings) if f.path == path)
                if f.status == OK:
                    try:
                        meta = read_metadata(path)
                        if fingerprint and meta.get("training_fingerprint") != fingerprint:
                            f.status, f.detail = MISMATCH, "trained with another config than checkpoint.pt"
                    except BaselineError as e:
                        f.status, f.detail = MISMATCH, str(e)

    def check_fisher_of_plan(self, variant: str):
        """A quantized file planned from a Fisher names it (provenance ``fisher``): the nearest fisher.pt."""
        m, _ = _load(os.path.join(variant, "metrics.json"), "json")
        if not m or not m.get("quantized_file"):
            return
        qpath = os.path.join(variant, m["quantized_file"])
        try:
            prov = read_quantized(qpath)["provenance"] or {}
        except (QuantizedFileError, OSError, FileNotFoundError):
            return  # check_variant reports the file itself
        if "fisher" not in prov:
            return
        fpath = (os.path.normpath(os.path.join(variant, prov["fisher_file"])) if prov.get("fisher_file")
                 else self.nearest(os.path.dirname(variant), "fisher.pt"))
        if fpath is not None and not os.path.exists(fpath):
            self.add(Finding(fpath, [qpath], MISSING, f"{os.path.relpath(qpath, self.run)} was planned from it"))
            return
        row = next(f for f in self.findings if f.path == qpath)
        if fpath is None:
            self.add(Finding(os.path.join(self.run, "baseline", "fisher.pt"), [qpath], MISSING,
                             f"{os.path.relpath(qpath, self.run)} was planned from it"))
            return
        row.depends.append(fpath)
        art, _ = _load(fpath, "torch")
        if art is None:
            return  # fisher.pt's own row says why
        want = {k: prov["fisher"].get(k) for k in FISHER_KEYS}
        have = json.loads(json.dumps({k: (art.get("meta") or {}).get(k) for k in FISHER_KEYS}, default=str))
        if want != have and row.status == OK:
            row.status, row.detail = MISMATCH, f"planned from another Fisher than {fpath} (settings or checkpoint)"

    def check_manifest(self, path: str):
        man, bad = _load(path, "json")
        if bad:
            self.add(bad)
            return
        folder = os.path.dirname(path)
        self.add(sealed(Finding(path, sorted(man.get("sources", {}))), man))
        for rel, sha in {**man.get("sources", {}), **man.get("outputs", {})}.items():
            target = os.path.normpath(os.path.join(folder, rel))
            if rel in man.get("outputs", {}):
                self.add(file_check(target, sha, path))
            else:  # a source changed after the summary was written: the summary is stale
                f = file_check(target, sha, path)
                if f.status != OK:
                    row = next(x for x in self.findings if x.path == path)
                    row.status, row.detail = f.status, f"{rel}: {f.detail.replace('SHA-256', 'its SHA-256')}" \
                                                      f" (the summary is stale)"

    def check_selection(self, path: str):
        """w4a4's ``selection.json``: the greedy ablation's damage of the variant beside it, on selection noise;
        sealed, and naming the SHA-256 of that variant's files and of the baseline weights."""
        s, bad = _load(path, "json")
        if bad:
            self.add(bad)
            return
        folder = os.path.dirname(path)
        files = [os.path.join(folder, f) for f in SELECTION_FILES]
        inputs = s.get("inputs") or {}
        ident = self.identity(os.path.dirname(folder))
        row = sealed(self._against(path, inputs.get("checkpoint_sha256"), ident), s)
        row.depends += [f for f in files if f not in row.depends]
        have = [storage.sha256_file(f) if os.path.exists(f) else None for f in files]
        if row.status == OK and have != inputs.get("files"):
            row.status, row.detail = MISMATCH, "the variant's files changed since its selection damage was measured"
        self.add(row)

    def check_sample_output(self, path: str):
        s, bad = _load(path, "json")
        if bad:
            self.add(bad)
            return
        folder = os.path.dirname(path)
        src = s.get("source") or {}
        inputs = [f for f in (src, src.get("act_quant") or {}) if f.get("path")]  # weights, activation quantizers
        row = sealed(Finding(path, [f["path"] for f in inputs] or ["?"]), s)
        for f in inputs if not row.problem else ():
            if not os.path.exists(f["path"]):
                row.status, row.detail = MISSING, f"its source {f['path']} is gone"
                break
            if storage.sha256_file(f["path"]) != f.get("sha256"):
                row.status, row.detail = MISMATCH, f"its source {f['path']} changed since it was sampled"
                break
        self.add(row)
        for name, sha in (s.get("files") or {}).items():
            self.add(file_check(os.path.join(folder, name), sha, path))

    # ------------------------------------------------------------------ the walk
    def walk(self) -> list:
        if not os.path.isdir(self.run):
            raise FileNotFoundError(f"{self.run}: no such run directory")
        for base in sorted(glob.glob(os.path.join(self.run, "**", "baseline"), recursive=True)):
            if os.path.isdir(base):
                self._guarded(base, self.check_baseline, base)
        for mpath in sorted(glob.glob(os.path.join(self.run, "**", "metrics.json"), recursive=True)):
            variant = os.path.dirname(mpath)

            def one(variant=variant):
                ident = self.identity(os.path.dirname(variant))
                self.add(*check_variant(variant, ident[0] if ident else None))
                self.check_fisher_of_plan(variant)

            self._guarded(mpath, one)
        for man in sorted(glob.glob(os.path.join(self.run, "**", "*.sources.json"), recursive=True)):
            self._guarded(man, self.check_manifest, man)
        for s in sorted(glob.glob(os.path.join(self.run, "**", "sample.json"), recursive=True)):
            self._guarded(s, self.check_sample_output, s)
        for s in sorted(glob.glob(os.path.join(self.run, "**", "selection.json"), recursive=True)):
            self._guarded(s, self.check_selection, s)
        curve = os.path.join(self.run, "learning_curve.json")
        if os.path.isfile(curve):
            c, bad = _load(curve, "json")
            self.add(bad or sealed(Finding(curve, ["baseline/snapshots"]), c))
        seen = {os.path.abspath(f.path) for f in self.findings}
        every = [os.path.join(d, f) for d, _, files in os.walk(self.run) for f in files]  # hidden folders too
        for path in sorted(every):
            if os.path.isfile(path) and os.path.basename(path) not in IGNORED and os.path.abspath(path) not in seen:
                self.add(Finding(path, [], UNREFERENCED, "no record of this run names it"))
                seen.add(os.path.abspath(path))
        return self._merged()

    def _guarded(self, path: str, check, *args):
        """``check(*args)``; a record whose fields have other types than ours (edited by hand, or a foreign file
        under our name) is a MISMATCH row naming ``path``, not a traceback that hides the table."""
        try:
            check(*args)
        except (KeyError, TypeError, AttributeError, ValueError, IndexError) as e:
            self.add(Finding(path, [], MISMATCH, f"malformed record ({type(e).__name__}: {str(e)[:120]})"))

    def _merged(self) -> list:
        """One row per file: a file checked from several records keeps its worst status and every dependency."""
        rank = {OK: 0, UNREFERENCED: 1, MISSING: 2, MISMATCH: 3}
        rows = {}
        for f in self.findings:
            key = os.path.abspath(f.path)
            if key not in rows:
                rows[key] = Finding(f.path, list(f.depends), f.status, f.detail)
                continue
            r = rows[key]
            r.depends += [d for d in f.depends if d not in r.depends]
            if rank[f.status] > rank[r.status]:
                r.status, r.detail = f.status, f.detail
        return sorted(rows.values(), key=lambda f: f.path)


def verify_run(run: str) -> list:
    """Every file of ``run`` with its status (``integrity.Finding``), one per file, sorted by path."""
    return RunVerifier(run).walk()


def table(findings: list, run: str, problems_only=False) -> str:
    root = os.path.abspath(run)

    def rel(p):
        a = os.path.abspath(p)
        return os.path.relpath(a, root) if a.startswith(root + os.sep) else p

    lines = ["| file | depends on | status | detail |", "|---|---|---|---|"]
    for f in findings:
        if problems_only and not f.problem:
            continue
        deps = ", ".join(sorted({rel(d) for d in f.depends})) or "–"
        lines.append(f"| {rel(f.path)} | {deps} | {f.status} | {f.detail} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run directory, e.g. runs/default")
    p.add_argument("--problems", action="store_true", help="list only the files with a problem")
    args = p.parse_args(argv)
    try:
        findings = verify_run(args.run)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    if not findings:  # nothing any step of this toolkit writes: a typo'd path, not an intact run
        raise SystemExit(f"error: {args.run}: no files of a run folder (metrics.json, checkpoints, caches) found; "
                         f"expected e.g. runs/default")
    problems = sum(f.problem for f in findings)
    print(table(findings, args.run, args.problems))
    print(f"verify: {len(findings)} files, {problems} problems")
    sys.exit(1 if problems else 0)
