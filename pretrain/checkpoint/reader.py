"""Read any committed checkpoint offline: full, un-sliced, reference-named fp32 tensors, one at a time.

A `step_<N>/model/` directory holds DeepSpeed's files for the layout it was written with. What lives where
(as DeepSpeed 0.19's engine, ZeRO-1/2, ZeRO-3 and bf16 optimizers write them, and its zero_to_fp32 reads them):

    mp_rank_<m>_model_states.pt        per model-parallel slice m (dp rank 0): 'module' (the module's weights; bf16
                                       under bf16), 'param_shapes' (ZeRO >= 1), and under ZeRO-0 'optimizer' (the
                                       torch optimizer's state_dict: Adam moments per parameter, by index)
    layer_<i>-model_<t>-model_states.pt  PipelineModule: layer i's weights on TP rank t (its own short names)
    [bf16_]zero_pp_rank_<d>_mp_rank_<m>_optim_states.pt
                                       ZeRO-1/2 (and the bf16 optimizer): DP rank d's flat fp32 partition per param
                                       group ('single_partition_of_fp32_groups'), the base optimizer's moments over
                                       the same flat partition, and 'param_slice_mappings': for each parameter the
                                       fragment (start, numel) of this partition that holds part of it. A parameter's
                                       fragments in DP-rank order concatenate to the whole (TP-local) parameter.
                                       ZeRO-3: 'fp32_flat_groups', every parameter split into ceil(numel/dp)-element
                                       pieces, one per DP rank, in 'param_shapes' order (zero_pp_rank_<d>_mp_rank_<m>
                                       _model_states.pt), the last piece zero-padded.
    m = pp_stage * tp + tp_rank        (the pipeline grid's model-parallel rank; = tp_rank without a pipeline)

So the fp32 master weight is the optimizer's partition under ZeRO >= 1 (never the bf16 module copy), and the module
itself under ZeRO-0 (fp32 only: the config refuses bf16 without ZeRO). TP pieces are concatenated along the one
dimension where the local shape differs from the full shape that the resolved run's model gives
(`reference_shapes`); megatron-core splits in contiguous chunks in TP-rank order (`pretrain.model.init.local_slice`
is the inverse). Parameter names become the reference model's ("layers.2.attention.wq.weight") through the
pipeline's `reference_name`.

Memory: every file is opened with `torch.load(mmap=True)` (restricted to tensors, plain data and the few DeepSpeed
classes the files hold: pretrain/checkpoint/files.py), and `tensor()` copies out only the pieces of one
parameter, so a read costs about one full parameter, whatever the model size. torch maps the whole file once
(`UntypedStorage.from_file`, MAP_PRIVATE) and every tensor in it is a slice of that one mapping, so each page a read
touches stays in this process's resident set for as long as any tensor of that file is alive: reading all of a
1.5 GB checkpoint through kept mappings ends with 1.5 GB resident. So the reader counts the bytes it has read
through its mappings (`mapped_bytes`) and, once they pass `map_budget` (MAP_BUDGET by default), drops every loaded
file, which unmaps it; the next read opens the file it needs again (unpickling only the small pickle, not the
data). Resident checkpoint pages therefore stay under map_budget plus one parameter's pieces; a checkpoint smaller
than the budget is opened once, as before.
"""
from __future__ import annotations

import contextlib
import math
import re
from pathlib import Path
from typing import Any, Iterator

import torch

from pretrain.checkpoint import files as checkpoint_files
from pretrain.checkpoint import CheckpointError, run_of, verify
from pretrain.model.init import reference_shapes
from pretrain.parallel.optimizer import decays
from pretrain.parallel.pipeline import reference_name
from pretrain.run.paths import MODEL_DIR
from pretrain.run.resolved import ResolvedRun, layout_words

KINDS = ("param", "exp_avg", "exp_avg_sq")
_LAYER_FILE = re.compile(r"^layer_(\d+)-model_(\d+)-model_states\.pt$")
MAP_BUDGET = 64 << 20  # bytes read through the file mappings before they are dropped (see the module docstring)


class CheckpointReader:
    """A committed step dir, read without a process group or a DeepSpeed engine."""

    def __init__(self, step_dir: str | Path, map_budget: int = MAP_BUDGET, *, verified: bool = False):
        """`verified`: the caller has checked the hashes already (a resume's collective check, a command's)."""
        self.step_dir = Path(step_dir)
        self.map_budget = map_budget
        self.mapped_bytes = 0  # bytes read through the mappings in self._files since they were last dropped
        # the training step the checkpoint was committed at
        self.step = int(verify(self.step_dir, hashes=not verified)["step"])
        self.run: ResolvedRun = run_of(self.step_dir)
        self.dir = self.step_dir / MODEL_DIR
        if not self.dir.is_dir():
            raise CheckpointError(f"{self.step_dir}: no DeepSpeed directory '{MODEL_DIR}'")
        lay = self.run.layout
        self.tp, self.pp, self.zero = lay.tp, lay.pp, self.run.zero_stage
        self.shards = lay.weight_replicas  # ZeRO partitions: one per DP x CP rank
        self.layout_text = layout_words(self.run)
        self._files: dict[str, Any] = {}
        self._current = ""  # the file last asked for: what a content error names
        self._full = reference_shapes(self.run.model)
        with self._content():
            # Per TP rank: reference name -> (engine name, local shape, model-parallel slice), in model order.
            self._local: list[dict[str, tuple[str, torch.Size, int]]] = [self._local_params(t)
                                                                         for t in range(self.tp)]
            self._names = list(self._local[0])
            missing, unexpected = set(self._full) - set(self._names), set(self._names) - set(self._full)
            if missing or unexpected:
                raise CheckpointError(f"{self.dir}: parameters do not match the recorded model (missing "
                                      f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
            self._where = [self._locate(t) for t in range(self.tp)]

    # ---------------------------------------------------------------------------------------------- public

    def names(self) -> list[str]:
        """Reference names of the model's parameters in model order (a tied head is not a parameter)."""
        return list(self._names)

    def tensor(self, name: str, kind: str = "param") -> torch.Tensor:
        """The whole fp32 tensor (padded vocabulary rows included, as trained): the master weight for "param",
        Adam's first/second moment for "exp_avg"/"exp_avg_sq"."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
        name = self._alias(name)
        dim = self.tp_split_dim(name)
        # no_grad: DeepSpeed saved its flat partitions with requires_grad, and an autograd graph from a view would
        # keep the whole mapped partition alive for as long as the caller keeps the result.
        with torch.no_grad(), self._content():
            pieces = [self._read_local(t, name, kind) for t in range(self.tp if dim is not None else 1)]
            whole = pieces[0] if dim is None else torch.cat(pieces, dim=dim)
        if self.mapped_bytes > self.map_budget:
            self._unmap()
        return whole

    def tp_split_dim(self, name: str) -> int | None:
        """The dimension the checkpoint's TP ranks split `name` along (megatron-core's partition_dim: 0 for
        column-parallel and vocabulary matrices, 1 for row-parallel); None when replicated or tp == 1."""
        name = self._alias(name)
        local, full = self._local[0][name][1], self._full[name]
        dims = [d for d, (a, b) in enumerate(zip(local, full)) if a != b]
        if not dims:
            return None
        if len(dims) != 1 or local[dims[0]] * self.tp != full[dims[0]]:
            raise CheckpointError(f"{self.dir}: {name} has local shape {tuple(local)} on TP rank 0, which is no "
                                  f"1/{self.tp} split of {tuple(full)}")
        return dims[0]

    def optimizer_step(self) -> int:
        """Adam's step count (optimizer steps taken; skipped non-finite steps do not count)."""
        with self._content():
            return self._optimizer_step()

    def _optimizer_step(self) -> int:
        if self.zero == 0:
            state = self._load(self._model_file(0)).get("optimizer") or {}
            steps = [s["step"] for s in state.get("state", {}).values() if "step" in s]
        else:
            osd = self._load(self._optim_file(0, 0))["optimizer_state_dict"]
            base = osd["optimizer_state_dict"] if self.zero == 3 else osd["base_optimizer_state"]
            steps = [s["step"] for s in base["state"].values() if "step" in s]
        return int(steps[0]) if steps else 0

    # --------------------------------------------------------------------------------------------- files

    def _load(self, name: str) -> Any:
        self._current = name
        if name not in self._files:
            path = self.dir / name
            if not path.is_file():
                raise CheckpointError(f"{self.dir}: {name} is missing (written with "
                                      f"{self.layout_text})")
            state = checkpoint_files.load(path, mmap=True)  # unreadable: CheckpointError naming the file
            if not isinstance(state, dict):
                raise CheckpointError(f"{path}: holds a {type(state).__name__}, not DeepSpeed's state dict")
            self._files[name] = state
        return self._files[name]

    @contextlib.contextmanager
    def _content(self) -> Iterator[None]:
        """A DeepSpeed file that loads but lacks what its layout puts there (a key, a type, a shape) is a
        CheckpointError naming the file, not a traceback from deep inside a read."""
        try:
            yield
        except CheckpointError:  # already says which file and what (a RuntimeError too)
            raise
        except (KeyError, TypeError, AttributeError, IndexError, ValueError, RuntimeError, StopIteration) as e:
            if checkpoint_files.host_failure(e):
                raise
            where = self.dir / self._current if self._current else self.dir
            raise CheckpointError(f"{where}: does not hold what {self.layout_text} "
                                  f"writes there ({type(e).__name__}: "
                                  f"{(str(e).strip().splitlines() or [''])[0][:160]})") from None

    def _unmap(self) -> None:
        """Forget every loaded file: their mappings go (and with them their resident pages) once the last tensor
        viewing them does; `tensor()` only returns copies, so that is now."""
        self._files.clear()
        self.mapped_bytes = 0

    def _mapped(self, t: torch.Tensor) -> torch.Tensor:
        """`t`, a view into a loaded file, counted against the mapping budget before it is read."""
        self.mapped_bytes += t.numel() * t.element_size()
        return t

    def _model_file(self, mp: int) -> str:
        if self.zero == 3:
            return f"zero_pp_rank_0_mp_rank_{mp:02d}_model_states.pt"
        return f"mp_rank_{mp:02d}_model_states.pt"

    def _optim_file(self, dp: int, mp: int) -> str:
        name = f"zero_pp_rank_{dp}_mp_rank_{mp:02d}_optim_states.pt"
        bf16 = f"bf16_{name}"  # DeepSpeed prefixes the file when bf16 is on, whatever optimizer class wrote it
        return bf16 if (self.dir / bf16).is_file() else name

    def _alias(self, name: str) -> str:
        if name == "output.weight" and self.run.model.tie_embeddings:
            return "tok_embeddings.weight"
        if name not in self._full:
            raise KeyError(f"{name!r} is not a parameter of this model (see names())")
        return name

    # ----------------------------------------------------------------------------------- which param where

    def _local_params(self, t: int) -> dict[str, tuple[str, torch.Size, int]]:
        """Reference name -> (the engine's name, TP-local shape, model-parallel slice) on TP rank t."""
        out: dict[str, tuple[str, torch.Size, int]] = {}
        if self.pp == 1:
            sd = self._load(self._model_file(t))
            shapes = {k: torch.Size(v) for g in (sd.get("param_shapes") or []) for k, v in g.items()}
            for key, value in sd["module"].items():
                if key in self._full and (not shapes or key in shapes):
                    out[key] = (key, shapes.get(key, getattr(value, "shape", None)), t)
            return out
        # Pipeline: every layer's weights are in its own file; the stage that owns it is found below.
        layers = sorted((int(m.group(1)), p.name) for p in self.dir.iterdir()
                        if (m := _LAYER_FILE.match(p.name)) and int(m.group(2)) == t)
        owner = self._stage_of_layer(t, [i for i, _ in layers])
        for i, fname in layers:
            for rest, value in self._load(fname).items():
                if isinstance(value, torch.Tensor):
                    pipe = f"{i}.{rest}"
                    out[reference_name(pipe, self.run.model.n_layers)] = (pipe, value.shape, owner[i] * self.tp + t)
        return out

    def _stage_of_layer(self, t: int, layers: list[int]) -> dict[int, int]:
        """Pipeline stage of each layer index. ZeRO-1 names its parameters in each stage's optimizer file; ZeRO-0's
        optimizer state is by position, so stages take consecutive layers until their parameter count is met."""
        if self.zero >= 1:
            owner = {}
            for s in range(self.pp):
                mappings = self._load(self._optim_file(0, s * self.tp + t))["optimizer_state_dict"]
                for group in mappings["param_slice_mappings"]:
                    for pipe in group:
                        owner[int(pipe.split(".", 1)[0])] = s
            return owner
        owner, it = {}, iter(layers)
        for s in range(self.pp):
            groups = self._load(self._model_file(s * self.tp + t))["optimizer"]["param_groups"]
            want = sum(len(g["params"]) for g in groups)
            while want > 0:
                i = next(it)
                owner[i] = s
                want -= sum(isinstance(v, torch.Tensor) for v in
                            self._load(f"layer_{i:02d}-model_{t:02d}-model_states.pt").values())
            if want < 0:
                raise CheckpointError(f"{self.dir}: stage {s}'s optimizer does not cover whole layers")
        for i in it:
            owner[i] = self.pp - 1  # layers without parameters
        return owner

    def _locate(self, t: int) -> dict[str, Any]:
        """Reference name -> where its TP-local piece lives for the optimizer's kinds (and the weight)."""
        local = self._local[t]
        where: dict[str, Any] = {}
        if self.zero == 0:
            # The torch optimizer's state is by index over param_groups: decayed matrices first, then vectors, each
            # in the module's parameter order (pretrain.parallel.optimizer.param_groups).
            by_mp: dict[int, list[str]] = {}
            for ref, (_, shape, mp) in local.items():
                by_mp.setdefault(mp, []).append(ref)
            for mp, refs in by_mp.items():
                opt = self._load(self._model_file(mp)).get("optimizer") or {"param_groups": []}
                ordered = [r for r in refs if decays(len(local[r][1]))] + [r for r in refs if not decays(len(local[r][1]))]
                ids = [i for g in opt["param_groups"] for i in g["params"]]
                if len(ids) != len(ordered):
                    raise CheckpointError(f"{self.dir}/{self._model_file(mp)}: optimizer has {len(ids)} parameters, "
                                          f"the model slice {len(ordered)}")
                for ref, idx in zip(ordered, ids):
                    where[ref] = (mp, idx)
            return where
        if self.zero in (1, 2):
            by_engine = {eng: ref for ref, (eng, _, _) in local.items()}
            for mp in sorted({mp for _, _, mp in local.values()}):
                for d in range(self.shards):
                    osd = self._load(self._optim_file(d, mp))["optimizer_state_dict"]
                    for g, mapping in enumerate(osd["param_slice_mappings"]):
                        for eng, frag in mapping.items():
                            where.setdefault(by_engine[eng], []).append((mp, d, g, frag.start, frag.numel))
            return where
        # ZeRO-3: one model-parallel slice per TP rank (no pipeline); pieces in param_shapes order over all groups.
        sd = self._load(self._model_file(t))
        offset = 0
        for group in sd["param_shapes"]:
            for eng, shape in group.items():
                piece = math.ceil(math.prod(shape) / self.shards)
                where[eng] = (t, offset, piece)
                offset += piece
        flat = sum(f.numel() for f in self._load(self._optim_file(0, t))["optimizer_state_dict"]["fp32_flat_groups"])
        if flat != offset:
            raise CheckpointError(f"{self.dir}: ZeRO-3 partitions hold {flat} elements, the parameters need {offset}")
        return where

    # ---------------------------------------------------------------------------------------------- reads

    def _read_local(self, t: int, ref: str, kind: str) -> torch.Tensor:
        eng, shape, mp = self._local[t][ref]
        numel = math.prod(shape)
        loc = self._where[t][ref]
        if self.zero == 0:
            mp, idx = loc
            if kind == "param":
                sd = self._load(self._model_file(mp)) if self.pp == 1 else None
                value = sd["module"][eng] if sd is not None else self._layer_tensor(eng, t)
                return self._mapped(value.detach()).float().clone().view(shape)
            state = self._load(self._model_file(mp))["optimizer"]["state"].get(idx, {})
            return self._mapped(state[kind]).float().clone().view(shape) if kind in state else torch.zeros(shape)
        if self.zero in (1, 2):
            parts = []
            for mp, d, g, start, n in loc:
                osd = self._load(self._optim_file(d, mp))["optimizer_state_dict"]
                flat = (osd["single_partition_of_fp32_groups"][g] if kind == "param"
                        else osd["base_optimizer_state"]["state"].get(g, {}).get(kind))
                parts.append(torch.zeros(n) if flat is None else self._mapped(flat.narrow(0, start, n)).float())
            out = torch.cat(parts)  # a fresh tensor, never a view into a file
        else:
            mp, offset, piece = loc
            parts = []
            for d in range(self.shards):
                osd = self._load(self._optim_file(d, mp))["optimizer_state_dict"]
                if kind == "param":
                    flats = osd["fp32_flat_groups"]
                else:
                    state = osd["optimizer_state_dict"]["state"]
                    flats = [state.get(g, {}).get(kind) for g in range(len(osd["fp32_flat_groups"]))]
                    flats = [torch.zeros_like(f) if s is None else s for s, f in zip(flats, osd["fp32_flat_groups"])]
                parts.append(self._mapped(_flat_slice(flats, offset, piece)))
            out = torch.cat(parts).narrow(0, 0, numel).clone()  # the last DP piece is zero-padded
        if out.numel() != numel:
            raise CheckpointError(f"{self.dir}: {ref} has {out.numel()} elements in the optimizer files, expected "
                                  f"{numel} ({tuple(shape)})")
        return out.view(shape)

    def _layer_tensor(self, pipe: str, t: int) -> torch.Tensor:
        layer, rest = pipe.split(".", 1)
        return self._load(f"layer_{int(layer):02d}-model_{t:02d}-model_states.pt")[rest]


def _flat_slice(flats: list[torch.Tensor], offset: int, numel: int) -> torch.Tensor:
    """[offset, offset + numel) of the concatenation of `flats` (ZeRO-3 sub-groups), without concatenating them."""
    parts = []
    for f in flats:
        n = f.numel()
        if offset < n and numel > 0:
            take = min(numel, n - offset)
            parts.append(f.narrow(0, offset, take).float())
            numel -= take
            offset = 0
        else:
            offset -= n
    if numel:
        raise CheckpointError("a ZeRO-3 partition ends before its parameters do")
    return torch.cat(parts) if len(parts) != 1 else parts[0]
