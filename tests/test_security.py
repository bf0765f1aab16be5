"""Security: no unsafe ``torch.load``, local rendezvous on loopback, secrets masked in config dumps.

- Every ``torch.load`` call in the repository's Python sources passes ``weights_only=True``
  (found by walking each file's syntax tree, whatever the import spelling).
- A local launch (loopback master address) serves its rendezvous store on loopback only:
  checked against the kernel's own table of listening sockets (``/proc/net/tcp*``).
- ``config.yaml`` in the run directory and ``--print-config`` mask secret-looking keys.
"""
from __future__ import annotations

import ast
import ipaddress
import os
import subprocess
import sys
import textwrap

import pytest
import yaml

from moe.trainer.redact import MASK, is_secret_key, redact
from parallel.launch import detect_launch, init_distributed
from tests.helpers.distributed import free_port
from tests.helpers.toy import toy_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_LOADS = {"torch.load", "torch.serialization.load"}
SKIP_DIRS = {"build", "dist", "node_modules", "__pycache__"}


# ------------------------------------------------------------------ torch.load(weights_only=True)
def _dotted(node):
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id] + parts[::-1])
    return None


def unsafe_torch_loads(source: str, filename: str = "<src>"):
    """``(line, code)`` of every use of torch.load in ``source`` that does not pass ``weights_only=True``.

    Import aliases are followed (``import torch as th``, ``from torch import load as L``,
    ``from torch.serialization import load``); a torch.load that is not called directly
    (passed around, ``functools.partial``) counts as unsafe: its arguments cannot be checked.
    """
    tree = ast.parse(source, filename)
    alias = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "torch" or a.name.startswith("torch."):
                    alias[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and (node.module == "torch"
                                                                   or node.module.startswith("torch.")):
            for a in node.names:
                alias[a.asname or a.name] = f"{node.module}.{a.name}"

    def resolve(node):
        name = _dotted(node)
        if name is None:
            return None
        head, _, rest = name.partition(".")
        if head not in alias:
            return None
        return alias[head] + ("." + rest if rest else "")

    called, bad = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and resolve(node.func) in TORCH_LOADS:
            called.add(id(node.func))
            safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                       for k in node.keywords)
            if not safe:
                bad.append((node.lineno, ast.unparse(node)))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Name, ast.Attribute)) and id(node) not in called and resolve(node) in TORCH_LOADS:
            if not isinstance(getattr(node, "ctx", None), ast.Store):
                bad.append((node.lineno, ast.unparse(node)))
    return sorted(set(bad))


def _python_files():
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in SKIP_DIRS
                       and not d.endswith(".egg-info")]
        for f in filenames:
            if f.endswith(".py"):
                yield os.path.join(dirpath, f)


def test_the_finder_catches_every_spelling_of_torch_load():
    src = textwrap.dedent("""
        import torch
        import torch as th
        import torch.serialization as ser
        from torch import load as tl
        from torch.serialization import load
        import functools
        torch .load(f)                             # 8 (same AST; the space keeps text greps quiet)
        th.load(f, map_location="cpu")             # 9
        ser.load(f, weights_only=False)            # 10
        tl(f, **kw)                                # 11
        load(f, weights_only=flag)                 # 12
        functools.partial(torch.load, f)           # 13
        torch.load(f, weights_only=True)           # fine
        th.serialization.load(f, weights_only=True)  # fine
        x.load(f)                                  # not torch
        json.load(f)                               # not torch
    """)
    assert [line for line, _ in unsafe_torch_loads(src)] == [8, 9, 10, 11, 12, 13]


def test_every_torch_load_in_the_repository_passes_weights_only_true():
    files = list(_python_files())
    assert any(f.endswith(os.path.join("moe", "trainer", "checkpoint", "io.py")) for f in files)  # the walk sees the code
    found = {}
    for path in files:
        with open(path, encoding="utf-8") as f:
            bad = unsafe_torch_loads(f.read(), path)
        if bad:
            found[os.path.relpath(path, ROOT)] = bad
    assert not found, f"torch.load without weights_only=True: {found}"


# ------------------------------------------------------------------ loopback rendezvous
def _listening_addresses(port: int):
    """Local addresses of the sockets listening on ``port``, from the kernel's tables."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                addr, hexport = fields[1].split(":")
                if int(hexport, 16) != port or fields[3] != "0A":  # 0A: LISTEN
                    continue
                raw = bytes.fromhex(addr)
                # each 32-bit word is in host (little-endian) order
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                out.append(ipaddress.ip_address(raw))
    return out


def _launch_env(monkeypatch, addr: str, port: int, rank: int = 0, world: int = 1):
    for name in ("TORCHELASTIC_USE_AGENT_STORE", "MOE_DIST_BACKEND", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in (("RANK", rank), ("WORLD_SIZE", world), ("LOCAL_RANK", rank), ("MASTER_ADDR", addr),
                        ("MASTER_PORT", port)):
        monkeypatch.setenv(name, str(value))


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="needs Linux's /proc/net/tcp")
@pytest.mark.parametrize("addr", ["127.0.0.1", "localhost"])
def test_local_rendezvous_listens_on_loopback_only(monkeypatch, addr):
    port = free_port()
    _launch_env(monkeypatch, addr, port)
    ctx = init_distributed("gloo", device="cpu")
    try:
        listening = _listening_addresses(port)
        assert listening and all(a.is_loopback for a in listening), listening
    finally:
        ctx.close()


_RANK_SCRIPT = """
import torch, torch.distributed as dist
from parallel.launch import init_distributed
ctx = init_distributed("gloo", device="cpu")
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
print("sum", int(t.item()), flush=True)
ctx.close()
"""


@pytest.mark.distributed
def test_two_local_ranks_meet_on_the_loopback_store():
    port = free_port()
    base = {k: v for k, v in os.environ.items() if k not in ("TORCHELASTIC_USE_AGENT_STORE", "MOE_DIST_BACKEND")}
    procs = [subprocess.Popen([sys.executable, "-c", _RANK_SCRIPT], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT,
                              env={**base, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "RANK": str(r),
                                   "WORLD_SIZE": "2", "LOCAL_RANK": str(r), "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": str(port)})
             for r in range(2)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=120)[0])
        finally:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs
    assert all("sum 3" in o for o in outs), outs


def test_single_node_slurm_rendezvous_defaults_to_loopback():
    one = {"SLURM_PROCID": "1", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "cn042"}
    assert detect_launch(one).master_addr == "127.0.0.1"
    assert detect_launch({**one, "SLURM_JOB_NODELIST": "cn[042-043]", "SLURM_NNODES": "1"}).master_addr == "127.0.0.1"
    assert detect_launch({**one, "MASTER_ADDR": "10.1.2.3"}).master_addr == "10.1.2.3"  # set by hand: kept
    multi = {**one, "SLURM_JOB_NODELIST": "cn[042-043]"}
    assert detect_launch(multi).master_addr == "cn042"  # other nodes must reach it
    assert detect_launch({**multi, "SLURM_NNODES": "2"}).master_addr == "cn042"


# ------------------------------------------------------------------ secrets in config dumps
@pytest.mark.parametrize("key", ["token", "hf_token", "HF_TOKEN", "api_key", "apiKey", "apikey", "wandb-api-key",
                                 "accessToken", "db_password", "passwd", "client_secret", "secret", "key",
                                 "aws.secret_access_key", "gcp_credentials", "ssh_passphrase"])
def test_secret_keys_are_recognised(key):
    assert is_secret_key(key)


@pytest.mark.parametrize("key", ["top_k", "key_padding_mask", "keep_checkpoints", "tokenizer", "num_tokens",
                                 "max_tokens", "tokens", "secret_path", "password_file", "keys", "monkey",
                                 "turkey_count", "pad_token", "eos_token", "bos_token", "pad_token_id",
                                 "jitter_eps", "expert_bias_rate", "out_dir", 3, None])
def test_ordinary_keys_are_not_secrets(key):
    assert not is_secret_key(key)


def test_redact_masks_nested_values_and_leaves_everything_else():
    data = {"model": {"top_k": 2, "hf_token": "hf_abc", "key_padding_mask": True},
            "data": {"sources": [{"url": "s3://b", "secret_key": "xyz"}, "plain"], "password": None,
                     "credentials": {"user": "me", "pass": "pw"}, "api_key": 12345}}
    assert redact(data) == {
        "model": {"top_k": 2, "hf_token": MASK, "key_padding_mask": True},
        "data": {"sources": [{"url": "s3://b", "secret_key": MASK}, "plain"], "password": None,
                 "credentials": MASK, "api_key": MASK}}
    assert data["model"]["hf_token"] == "hf_abc"  # the input is untouched


def test_config_dumps_mask_secrets(tmp_path, monkeypatch, capsys):
    from moe.train import main
    from moe.trainer.loop import run

    secret = "hf_S3cr3tValue"
    cfg = toy_config(tmp_path / "run", data={"hf_token": secret, "api_key": secret + "2"},
                     train={"steps": 1, "log_every": 1, "eval_every": 0, "checkpoint_every": 0})
    lines = []
    run(cfg, log=lines.append)
    dumped = (tmp_path / "run" / "config.yaml").read_text()
    assert secret not in dumped and not any(secret in line for line in lines)
    assert yaml.safe_load(dumped)["data"] == {"hf_token": MASK, "api_key": MASK}
    assert yaml.safe_load(dumped)["train"]["steps"] == 1  # the rest is the real config
    # --print-config
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())  # the plain config (to_yaml() without redacted=True keeps values)
    assert secret in path.read_text()
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    assert main(["--config", str(path), "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert secret not in printed and yaml.safe_load(printed)["data"]["hf_token"] == MASK
