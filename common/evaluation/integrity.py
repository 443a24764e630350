"""Whether a variant folder is what its ``metrics.json`` says it is: every recorded hash and cross-reference.

A variant's ``metrics.json`` records the SHA-256 of its quantized file (``quantized_sha256``), of every other
file it was computed with or wrote (``files``: ``plan.json``, ``act_quant.safetensors``, ``samples.png``),
the digest of each seed's samples (``per_seed.<k>.samples_sha256``), the weights it evaluated (``weights_id``,
which the quantized file's own record must reproduce) and the checkpoint they came from
(``checkpoint_sha256``). ``plan.json`` records the quantized file it describes (``quantized_sha256``).
``check_variant`` re-reads all of it (safetensors, ``weights_only`` torch loads and JSON only; it never
writes) and returns one ``Finding`` per file; ``evaluate.reusable`` and the report refuse a variant with a
problem, and ``python -m common.verify`` tabulates them for a whole run.
"""
import hashlib
import os
from dataclasses import dataclass, field

from ..core import storage
from ..quant.activations import load_act_quant, quantizer_digest
from ..quant.container import QuantizedFileError, read_quantized, stored_digest
from .metrics import tensor_digest

OK, MISMATCH, MISSING, UNREFERENCED = "OK", "MISMATCH", "MISSING", "UNREFERENCED"
PROBLEMS = (MISMATCH, MISSING, UNREFERENCED)
ACT_FILE = "act_quant.safetensors"
# what a w4a4 ablation row's selection.json measured (its files' SHA-256 in this order)
SELECTION_FILES = ("quantized.safetensors", ACT_FILE)


@dataclass
class Finding:
    path: str                                    # the file checked
    depends: list = field(default_factory=list)  # the files / records it is checked against
    status: str = OK
    detail: str = ""

    @property
    def problem(self) -> bool:
        return self.status in PROBLEMS


def bind_files(folder: str, names) -> dict:
    """{name: SHA-256} of the files ``names`` in ``folder`` (what a ``metrics.json`` records as ``files``)."""
    return {n: storage.sha256_file(os.path.join(folder, n)) for n in names}


def file_check(path: str, want: str, recorded_in: str) -> Finding:
    """``path`` against the SHA-256 ``want`` that the record ``recorded_in`` holds: OK, MISSING or MISMATCH."""
    if not os.path.exists(path):
        return Finding(path, [recorded_in], MISSING, f"{os.path.basename(recorded_in)} records it")
    if storage.sha256_file(path) != want:
        return Finding(path, [recorded_in], MISMATCH, f"SHA-256 differs from the one {os.path.basename(recorded_in)} "
                                                      f"records (edited, truncated, corrupted or replaced)")
    return Finding(path, [recorded_in])


def sealed(f: Finding, record) -> Finding:
    """``f`` marked MISMATCH (if it is OK so far) when the JSON ``record`` is not what was written
    (``storage.seal_ok``: a field edited or damaged, or no seal at all)."""
    ok = storage.seal_ok(record)
    if not ok and f.status == OK:
        f.status, f.detail = MISMATCH, (f"its content is not what was written (a field edited or damaged: "
                                        f"{storage.SEAL} differs)" if ok is False else
                                        f"carries no {storage.SEAL} (written before records were sealed)")
    return f


def check_variant(folder: str, baseline_sha256=None) -> list:
    """Findings for every file of one variant folder (one with a ``metrics.json``).

    ``baseline_sha256``: the SHA-256 of the baseline weights the run uses, when known, checked against the
    variant's ``checkpoint_sha256``. The fp32 reference of the paired MSE is the ``fp32`` folder beside it.
    """
    mpath = os.path.join(folder, "metrics.json")
    try:
        m = storage.load_json(mpath)
    except storage.CorruptFileError as e:
        return [Finding(mpath, [], MISMATCH, str(e))]
    found, mrow = [], sealed(Finding(mpath, []), m)
    if baseline_sha256 and mrow.status == OK and m.get("checkpoint_sha256") != baseline_sha256:
        mrow.depends.append("baseline weights")
        mrow.status, mrow.detail = MISMATCH, (f"computed from checkpoint {str(m.get('checkpoint_sha256'))[:12]}..., "
                                              f"but the run's baseline is {baseline_sha256[:12]}...")
    found.append(mrow)
    qname = m.get("quantized_file")
    qfile = None
    if qname:
        mrow.depends.append(os.path.join(folder, qname))
        f = file_check(os.path.join(folder, qname), m.get("quantized_sha256") or "", mpath)
        if f.status == OK:
            f, qfile = _check_quantized(f, m)
        found.append(f)
    elif os.path.basename(folder) != "fp32" and m.get("strategy") not in (None, "fp32"):
        mrow.status, mrow.detail = MISMATCH, "a quantized variant whose metrics.json names no quantized file"
    if "files" not in m:
        if mrow.status == OK:
            mrow.status, mrow.detail = MISMATCH, "records no 'files' (written before plans were bound to results)"
    else:
        for name, sha in m["files"].items():
            mrow.depends.append(os.path.join(folder, name))
            f = file_check(os.path.join(folder, name), sha, mpath)
            if f.status == OK and name == "plan.json":
                f = _check_plan(f, m)
            if f.status == OK and name == ACT_FILE and qfile is not None:
                f = _check_act_file(f, m, qfile)
            found.append(f)
    found += _check_samples(folder, m, mpath)
    ref = _check_reference(folder, m, mpath)
    if ref:
        mrow.depends.append(ref.depends[0])
        if ref.problem and mrow.status == OK:
            mrow.status, mrow.detail = ref.status, ref.detail
    return found


def _check_quantized(f: Finding, m: dict):
    """The quantized file reads (its own SHA-256 record included) and holds the weights ``weights_id`` names."""
    try:
        blob = read_quantized(f.path)
    except (QuantizedFileError, OSError) as e:
        f.status, f.detail = MISMATCH, str(e)
        return f, None
    prov = blob.get("provenance") or {}
    if m.get("checkpoint_sha256") and prov.get("checkpoint_sha256") not in (None, m["checkpoint_sha256"]):
        f.status, f.detail = MISMATCH, "its provenance names another checkpoint than metrics.json"
        return f, None
    digest = stored_digest(blob["tensors"])
    # a W/A variant's weights_id also hashes its activation quantizer: checked with that file (_check_act_file)
    if ACT_FILE not in (m.get("files") or {}) and m.get("weights_id") != digest:
        f.status, f.detail = MISMATCH, "its tensors are not the weights metrics.json evaluated (weights_id)"
        return f, None
    return f, digest


def _check_plan(f: Finding, m: dict) -> Finding:
    try:
        plan = storage.load_json(f.path)
    except storage.CorruptFileError as e:
        f.status, f.detail = MISMATCH, str(e)
        return f
    f.depends.append(os.path.join(os.path.dirname(f.path), str(m.get("quantized_file"))))
    if sealed(f, plan).status == OK and plan.get("quantized_sha256") != m.get("quantized_sha256"):
        f.status, f.detail = MISMATCH, "describes another quantized file than metrics.json's (quantized_sha256)"
    return f


def _check_act_file(f: Finding, m: dict, weights_digest: str) -> Finding:
    """metrics.json's ``weights_id`` of a W/A variant hashes the stored weights and the activation quantizer."""
    try:
        q, _ = load_act_quant(f.path)
    except Exception as e:  # safetensors raises its own types for damaged headers
        f.status, f.detail = MISMATCH, f"unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        return f
    if hashlib.sha256((weights_digest + quantizer_digest(q)).encode()).hexdigest() != m.get("weights_id"):
        f.status, f.detail = MISMATCH, "weights + activation quantizer are not what metrics.json evaluated"
    return f


def _check_samples(folder: str, m: dict, mpath: str) -> list:
    out = []
    for seed, r in (m.get("per_seed") or {}).items():
        path = os.path.join(folder, f"samples_seed{seed}.pt")
        if not os.path.exists(path):
            out.append(Finding(path, [mpath], MISSING, "metrics.json was computed from these samples"))
            continue
        try:
            x = storage.load_torch(path)
            same = tensor_digest(x) == r.get("samples_sha256")
        except (storage.CorruptFileError, TypeError, AttributeError, RuntimeError) as e:
            out.append(Finding(path, [mpath], MISMATCH, str(e)))
            continue
        out.append(Finding(path, [mpath], OK if same else MISMATCH,
                           "" if same else "not the samples metrics.json was computed from (samples_sha256)"))
    return out


def _check_reference(folder: str, m: dict, mpath: str):
    """The paired-MSE reference: the fp32 variant beside this one, same checkpoint and evaluation settings."""
    if os.path.basename(folder) == "fp32" or m.get("paired_mse_vs_fp32") is None:
        return None
    ref = os.path.join(os.path.dirname(folder), "fp32", "metrics.json")
    if not os.path.exists(ref):
        return Finding(mpath, [ref], MISSING, f"its paired MSE was measured against {ref}")
    try:
        r = storage.load_json(ref)
    except storage.CorruptFileError as e:
        return Finding(mpath, [ref], MISMATCH, str(e))
    if (r.get("checkpoint_sha256"), r.get("eval_fingerprint")) != (m.get("checkpoint_sha256"),
                                                                   m.get("eval_fingerprint")):
        return Finding(mpath, [ref], MISMATCH, "its fp32 reference has another checkpoint or evaluation settings")
    for seed, row in (m.get("per_seed") or {}).items():  # recorded since 2026-12-06
        want = row.get("fp32_samples_sha256") if isinstance(row, dict) else None
        have = ((r.get("per_seed") or {}).get(seed) or {}).get("samples_sha256")
        if want is not None and want != have:
            return Finding(mpath, [ref], MISMATCH, f"its paired MSE (seed {seed}) was measured against other fp32 "
                                                   f"samples than {ref} records now (fp32 re-evaluated since)")
    return Finding(mpath, [ref])


def first_problem(findings: list):
    return next((f for f in findings if f.problem), None)
