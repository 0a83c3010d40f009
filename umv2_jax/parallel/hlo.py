"""Collectives of a compiled program, read from its optimized HLO text.

    compiled = jax.jit(step, in_shardings=..., out_shardings=...).trace(*abstract).lower().compile()
    ops = collectives(compiled.as_text())            # [Collective(kind, result, operands, groups)]
    bytes_moved(ops)                                 # {"all-reduce": 1.2e6, "all-gather": ...}
    largest(ops, "all-gather")                       # the biggest all-gather, or None
    axes_of_groups(ops[0].groups, mesh)              # ("data",): the mesh axes a group spans

Kinds: all-gather, all-reduce, reduce-scatter, all-to-all, ragged-all-to-all, collective-permute.
Asynchronous pairs (`all-gather-start` / `all-gather-done`, …) count once, as their `-start`.

Replica groups are read in the three forms XLA prints: explicit `{{0,1},{2,3}}`, iota
`[2,4]<=[8]` / `[4,2]<=[2,2,2]T(1,0,2)` (= `iota(8).reshape(2, 2, 2).transpose(1, 0, 2)
.reshape(4, 2)`), and mesh axes `mesh['axis_0'=2,'axis_1'=4], device_ids=(...) {'axis_0'}` (devices
that differ only along the listed axes of XLA's own mesh form a group; a sub-axis prints as
`'axis_0':(pre)size`). Group members are partition ids: positions in the program's device assignment,
which for a program jitted with a Mesh's shardings is `mesh.devices.flat`.

Bytes: `Collective.bytes` is the larger of the operand and result buffers (for an all-gather the
gathered result, for a reduce-scatter the unscattered operand, for an all-reduce either), per device.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence

import numpy as np

KINDS = (
    "all-gather",
    "all-reduce",
    "reduce-scatter",
    "all-to-all",
    "ragged-all-to-all",
    "collective-permute",
)

# Bytes per element; sub-byte types count fractionally.
_DTYPE_BYTES = {
    "pred": 1,
    "s2": 0.25,
    "u2": 0.25,
    "s4": 0.5,
    "u4": 0.5,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
}

_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<type>.+?)\s+(?P<op>[a-z][\w\-]*)\("
)
_ARRAY = re.compile(r"\b(?P<dtype>[a-z][a-z0-9]*)\[(?P<dims>[\d,]*)\]")


@dataclasses.dataclass(frozen=True)
class Array:
    """One array buffer: dtype name as HLO prints it ("f32", "bf16", "s32", …) and its dims."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def bytes(self) -> int:
        if (
            self.dtype.startswith("f8")
            or self.dtype.startswith("f4")
            or self.dtype.startswith("f6")
        ):
            per = 1.0 if self.dtype.startswith("f8") else 0.5
        else:
            per = _DTYPE_BYTES.get(self.dtype, 0)
        return int(np.ceil(per * int(np.prod(self.shape, dtype=np.int64))))


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective instruction of the program (per device).

    kind: one of KINDS (an async `-start` reports its base kind, `async_` True).
    result, operands: the arrays it produces and consumes (tuples flattened; an async start's
    bookkeeping buffers left out). groups: the replica groups as tuples of partition ids, () when
    the instruction names none (every device); a collective-permute's groups are the connected
    components of its source → target pairs, which are kept in `pairs`.
    """

    name: str
    kind: str
    result: tuple[Array, ...]
    operands: tuple[Array, ...]
    groups: tuple[tuple[int, ...], ...]
    pairs: tuple[tuple[int, int], ...] = ()
    async_: bool = False
    line: str = ""

    @property
    def bytes(self) -> int:
        return max(_total(self.result), _total(self.operands))

    @property
    def group_size(self) -> int:
        return len(self.groups[0]) if self.groups else 0


def _total(arrays: Iterable[Array]) -> int:
    return sum(a.bytes for a in arrays)


def parse_arrays(text: str) -> tuple[Array, ...]:
    """Every `dtype[d0,d1,...]` in an HLO type string (a tuple type gives several), in order."""
    out = []
    for match in _ARRAY.finditer(text):
        dims = match.group("dims")
        out.append(Array(match.group("dtype"), tuple(int(d) for d in dims.split(",") if d)))
    return tuple(out)


def collectives(hlo_text: str) -> list[Collective]:
    """The collectives of an HLO module's text (`compiled.as_text()` or `lowered.as_text("hlo")`),
    in program order; async `-done` halves are skipped (their `-start` is listed)."""
    lines = hlo_text.splitlines()
    types: dict[str, str] = {}
    parsed = []
    for line in lines:
        match = _INSTRUCTION.match(line)
        if match is None:
            continue
        types[match.group("name")] = match.group("type")
        parsed.append((match, line))
    result = []
    for match, line in parsed:
        op = match.group("op")
        is_start = op.endswith("-start")
        base = op[: -len("-start")] if is_start else op
        if base not in KINDS:
            continue
        operand_text = _balanced(line, match.end() - 1)
        attributes = line[match.end() - 1 + len(operand_text) + 2 :]
        operands = _operand_arrays(operand_text, types)
        produced = parse_arrays(match.group("type"))
        if is_start and base in ("all-gather", "collective-permute", "all-reduce"):
            produced = _start_results(base, produced, operands)
        pairs = _pairs(attributes) if base == "collective-permute" else ()
        groups = _components(pairs) if pairs else parse_replica_groups(attributes)
        result.append(
            Collective(
                name=match.group("name"),
                kind=base,
                result=produced,
                operands=operands,
                groups=groups,
                pairs=pairs,
                async_=is_start,
                line=line.strip(),
            )
        )
    return result


def bytes_moved(ops: Iterable[Collective]) -> dict[str, int]:
    """{kind: total bytes of its collectives} (per device, each instruction once; kinds absent
    from the program are absent here)."""
    totals: dict[str, int] = {}
    for op in ops:
        totals[op.kind] = totals.get(op.kind, 0) + op.bytes
    return totals


def largest(ops: Iterable[Collective], kind: str) -> Collective | None:
    """The collective of `kind` that moves the most bytes, or None when there is none."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
    of_kind = [op for op in ops if op.kind == kind]
    return max(of_kind, key=lambda op: op.bytes) if of_kind else None


def axes_of_groups(groups: Sequence[Sequence[int]], mesh) -> tuple[str, ...]:
    """The mesh axes (in mesh order) along which members of some group differ.

    groups: partition ids (positions in `mesh.devices.flat`); () means one group of every device.
    E.g. on a (data 2, fsdp 1, tensor 2, expert 2) mesh, {{0,4},{1,5},{2,6},{3,7}} → ("data",).
    Axes of size 1 never appear. ValueError for an id outside the mesh.
    """
    sizes = tuple(int(mesh.shape[a]) for a in mesh.axis_names)
    count = int(np.prod(sizes))
    if not groups:
        return tuple(a for a, s in zip(mesh.axis_names, sizes) if s > 1)
    varying = [False] * len(sizes)
    for group in groups:
        ids = np.asarray(group, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= count):
            raise ValueError(f"replica group {list(group)} has ids outside the {count}-device mesh")
        coords = np.stack(np.unravel_index(ids, sizes), axis=1)  # [members, axes]
        for axis in range(len(sizes)):
            if len(set(coords[:, axis].tolist())) > 1:
                varying[axis] = True
    return tuple(a for a, v in zip(mesh.axis_names, varying) if v)


# --------------------------------------------------------------------------------------------------
# Replica-group forms.


def parse_replica_groups(attributes: str) -> tuple[tuple[int, ...], ...]:
    """The replica groups of an instruction's attribute text (after its operand list)."""
    key = "replica_groups="
    at = attributes.find(key)
    if at < 0:
        return ()
    text = attributes[at + len(key) :]
    if text.startswith("{"):
        body = _balanced_braces(text)
        groups = (_ints(g) for g in re.findall(r"\{([\d,\s]*)\}", body[1:-1]))
        return tuple(tuple(g) for g in groups if g)
    if text.startswith("["):
        match = re.match(r"\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", text)
        if match is None:
            raise ValueError(f"unreadable iota replica groups: {text[:80]!r}")
        shape = _ints(match.group(1))
        return _rows(_iota(match.group(2), match.group(3)).reshape(shape))
    if text.startswith("mesh["):
        return _mesh_groups(text)
    raise ValueError(f"unreadable replica groups: {text[:80]!r}")


def _mesh_groups(text: str) -> tuple[tuple[int, ...], ...]:
    """Groups of the mesh-axes form: mesh['a'=2,'b'=4](, device_ids=(...))? {'a', 'b':(1)2}."""
    match = re.match(r"mesh\[([^\]]*)\]", text)
    if match is None:
        raise ValueError(f"unreadable mesh replica groups: {text[:80]!r}")
    names, sizes = [], []
    for item in match.group(1).split(","):
        name, size = item.rsplit("=", 1)
        names.append(name.strip().strip("'\""))
        sizes.append(int(size))
    rest = text[match.end() :]
    devices = np.arange(int(np.prod(sizes)), dtype=np.int64)
    ids = re.match(r",\s*device_ids=\(([^)]*(?:\)[^){]*)?)\)\s*", rest)
    if ids is not None:
        spec = ids.group(1).strip()
        iota = re.fullmatch(r"\[([\d,]+)\](?:T\(([\d,]+)\))?", spec)
        if iota is not None:
            shape = _ints(iota.group(1))
            devices = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)
            if iota.group(2):
                devices = devices.transpose(_ints(iota.group(2)))
            devices = devices.reshape(-1)
        else:
            devices = np.asarray(_ints(spec.strip("[]")), dtype=np.int64)
        rest = rest[ids.end() :]
    brace = re.match(r"\s*\{([^}]*)\}", rest)
    if brace is None:
        raise ValueError(f"mesh replica groups without an axis list: {text[:80]!r}")
    # Split each mesh axis into the sub-axes that are referenced: (pre, size, post).
    refs = []
    for item in brace.group(1).split(","):
        item = item.strip()
        if not item:
            continue
        sub = re.fullmatch(r"'?([^':]+)'?(?::\((\d+)\)(\d+))?", item)
        if sub is None:
            raise ValueError(f"unreadable mesh axis {item!r} in replica groups")
        index = names.index(sub.group(1))
        if sub.group(2):
            refs.append((index, int(sub.group(2)), int(sub.group(3))))
        else:
            refs.append((index, 1, sizes[index]))
    fine_shape, group_dims = [], []
    for index, size in enumerate(sizes):
        mine = sorted((pre, sz) for i, pre, sz in refs if i == index)
        cursor = 1
        for pre, sz in mine:
            if pre > cursor:
                fine_shape.append(pre // cursor)
            group_dims.append(len(fine_shape))
            fine_shape.append(sz)
            cursor = pre * sz
        if cursor < size:
            fine_shape.append(size // cursor)
    grid = devices.reshape(fine_shape)
    others = [d for d in range(len(fine_shape)) if d not in group_dims]
    grid = grid.transpose(others + group_dims)
    group_size = int(np.prod([fine_shape[d] for d in group_dims])) if group_dims else 1
    return _rows(grid.reshape(-1, group_size))


def _iota(shape: str, perm: str | None) -> np.ndarray:
    dims = _ints(shape)
    array = np.arange(int(np.prod(dims)), dtype=np.int64).reshape(dims)
    return array.transpose(_ints(perm)) if perm else array


def _rows(array: np.ndarray) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(int(x) for x in row) for row in array.reshape(array.shape[0], -1))


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _pairs(attributes: str) -> tuple[tuple[int, int], ...]:
    match = re.search(r"source_target_pairs=\{(.*?)\}\}", attributes)
    if match is None:
        return ()
    return tuple(
        (int(a), int(b)) for a, b in re.findall(r"\{\s*(\d+)\s*,\s*(\d+)\s*\}", match.group(0))
    )


def _components(pairs: Sequence[tuple[int, int]]) -> tuple[tuple[int, ...], ...]:
    """Connected components of the permute graph, each sorted, ordered by smallest member."""
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        parent[find(a)] = find(b)
    members: dict[int, list[int]] = {}
    for x in list(parent):
        members.setdefault(find(x), []).append(x)
    return tuple(sorted(tuple(sorted(m)) for m in members.values()))


# --------------------------------------------------------------------------------------------------
# Instruction text.


def _balanced(line: str, open_at: int) -> str:
    """The text inside the parenthesis that opens at `open_at` (nested parentheses kept)."""
    depth = 0
    for i in range(open_at, len(line)):
        if line[i] == "(":
            depth += 1
        elif line[i] == ")":
            depth -= 1
            if depth == 0:
                return line[open_at + 1 : i]
    return line[open_at + 1 :]


def _balanced_braces(text: str) -> str:
    depth = 0
    for i, ch in enumerate(text):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[: i + 1]
    return text


def _operand_arrays(operand_text: str, types: dict[str, str]) -> tuple[Array, ...]:
    """Operands' arrays: from the types printed inline, else from the operands' definitions."""
    out: list[Array] = []
    for token in _split_top(operand_text):
        inline = parse_arrays(token.split("%")[0]) if "%" in token else parse_arrays(token)
        if inline:
            out.extend(inline)
            continue
        name = token.strip().lstrip("%")
        if name in types:
            out.extend(parse_arrays(types[name]))
    return tuple(out)


def _split_top(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if text[start:].strip():
        parts.append(text[start:])
    return parts


def _start_results(base: str, produced: tuple[Array, ...], operands: tuple[Array, ...]):
    """An async start's result tuple holds (operands, results[, u32 contexts]): keep the results."""
    if base == "all-reduce":
        return produced
    arrays = [a for a in produced if not (a.dtype == "u32" and a.shape == ())]
    if len(arrays) >= 2 * len(operands) and operands:
        return tuple(arrays[len(operands) : 2 * len(operands)])
    return tuple(arrays)


# --------------------------------------------------------------------------------------------------
# Per-step totals: loop bodies counted once per trip.


@dataclasses.dataclass(frozen=True)
class StepCost:
    """What one run of a compiled program does per device, loop bodies counted per trip.

    collective_bytes: {kind: bytes} (as `bytes_moved`, each collective × its computation's trips);
    flops: 2·multiply-adds of every dot and convolution (custom calls, e.g. Pallas kernels, are
    opaque: not counted); hbm_bytes: operand + result bytes of every instruction outside fusions
    (a fusion counts its own operands and outputs once: what XLA's cost model calls bytes accessed);
    trips: {while instruction name: trip count used}; unknown_trips: while loops whose trip count
    is neither in `known_trip_count` nor a `compare(i, constant), direction=LT` condition (counted
    once).
    """

    collective_bytes: dict[str, int]
    flops: float
    hbm_bytes: float
    trips: dict[str, int]
    unknown_trips: tuple[str, ...]


_HEADER = re.compile(r"^\s*(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s+\(.*\)\s*->\s*.*\{\s*$")
_CALLEE = re.compile(
    r"\b(?P<key>body|condition|calls|to_apply|true_computation|false_computation)=%?(?P<name>[\w.\-]+)"
)
_BRANCHES = re.compile(r"\b(?:branch_computations|called_computations)=\{(?P<names>[^}]*)\}")
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')
# Instructions that move no HBM bytes of their own (views, tuples, control flow, bookkeeping).
_FREE = {
    "parameter",
    "constant",
    "get-tuple-element",
    "tuple",
    "bitcast",
    "while",
    "call",
    "conditional",
    "after-all",
    "partition-id",
    "replica-id",
    "opt-barrier",
    "add-dependency",
    "domain",
}


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str | None]:
    """{computation name: its instruction lines}, and the entry computation's name."""
    bodies: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        if current is None:
            header = _HEADER.match(line)
            if header is not None and " = " not in line.split("(", 1)[0]:
                current = header.group("name")
                bodies[current] = []
                if line.lstrip().startswith("ENTRY"):
                    entry = current
            continue
        if line.strip() == "}":
            current = None
            continue
        bodies[current].append(line)
    return bodies, entry


def _condition_bound(name: str, bodies: dict[str, list[str]]) -> int | None:
    """N of a scan-style loop condition `compare(i, N), direction=LT` with N a scalar constant of
    the condition; the compare may sit in a computation the condition calls (XLA:TPU wraps it)."""
    lines = bodies.get(name, [])
    constants = {}
    for line in lines:
        match = re.match(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*s\d+\[\]\s+constant\((-?\d+)\)", line)
        if match:
            constants[match.group(1)] = int(match.group(2))
    for line in lines:
        if " compare(" in line and "direction=LT" in line:
            names = re.findall(r"%?([\w.\-]+)", _balanced(line, line.index(" compare(") + 8))
            bounds = [constants[n] for n in names if n in constants]
            if bounds:
                return bounds[-1]
    called = [m.group("name") for line in lines for m in _CALLEE.finditer(line)]
    wrapped = any(
        " compare(" in inner and "direction=LT" in inner
        for callee in called
        for inner in bodies.get(callee, [])
    )
    if wrapped and len(constants) == 1:
        return next(iter(constants.values()))
    return None


def step_cost(hlo_text: str) -> StepCost:
    """Collective bytes, FLOPs and HBM bytes of one run of an optimized HLO module, per device,
    with every computation weighted by how often it runs (a while body: × its trip count).

    Read from `compiled.as_text()`; `compiled.cost_analysis()` counts a loop body once, which
    under-counts a scanned model by its depth.
    """
    bodies, entry = _computations(hlo_text)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    types: dict[str, str] = {}
    for lines in bodies.values():
        for line in lines:
            match = _INSTRUCTION.match(line)
            if match is not None:
                types[match.group("name")] = match.group("type")
    callers: dict[str, list[tuple[str, int, str]]] = {}  # callee → [(caller, factor, key)]
    trips: dict[str, int] = {}
    unknown: list[str] = []
    for caller, lines in bodies.items():
        for line in lines:
            match = _INSTRUCTION.match(line)
            if match is None:
                continue
            factor = 1
            if match.group("op") == "while":
                trip = _TRIP.search(line)
                condition = re.search(r"\bcondition=%?([\w.\-]+)", line)
                bound = None
                if trip is None and condition is not None:
                    bound = _condition_bound(condition.group(1), bodies)
                factor = int(trip.group(1)) if trip else bound
                if factor is None:
                    unknown.append(match.group("name"))
                    factor = 1
                trips[match.group("name")] = factor
            for callee in _CALLEE.finditer(line):
                callers.setdefault(callee.group("name"), []).append(
                    (
                        caller,
                        factor if callee.group("key") in ("body", "condition") else 1,
                        callee.group("key") if match.group("op") != "fusion" else "fused",
                    )
                )
            for group in _BRANCHES.finditer(line):
                for name in re.findall(r"%?([\w.\-]+)", group.group("names")):
                    callers.setdefault(name, []).append((caller, 1, "branch"))

    memo: dict[str, float] = {entry: 1.0}
    fused: dict[str, bool] = {entry: False}

    def weight(name: str, depth: int = 0) -> float:
        if name in memo:
            return memo[name]
        memo[name] = 0.0  # guards a malformed cyclic graph
        total, inside = 0.0, True
        for caller, factor, key in callers.get(name, []):
            if depth > 200:
                break
            w = weight(caller, depth + 1)
            total += w * factor
            inside = inside and (key in ("fused", "to_apply") or fused.get(caller, False))
        memo[name], fused[name] = total, inside and bool(callers.get(name))
        return total

    moved: dict[str, int] = {}
    flops = 0.0
    hbm = 0.0
    for name, lines in bodies.items():
        w = weight(name)
        if w == 0:
            continue
        text = "\n".join(lines)
        for op in collectives(text):
            moved[op.kind] = moved.get(op.kind, 0) + int(op.bytes * w)
        for line in lines:
            match = _INSTRUCTION.match(line)
            if match is None:
                continue
            op = match.group("op")
            if op in ("dot", "convolution"):
                flops += w * _dot_flops(line, match, types)
            if not fused[name] and op not in _FREE and not op.endswith("-done"):
                operands = _operand_arrays(_balanced(line, match.end() - 1), types)
                hbm += w * (_total(parse_arrays(match.group("type"))) + _total(operands))
    return StepCost(moved, flops, hbm, trips, tuple(unknown))


def _dot_flops(line: str, match: re.Match, types: dict[str, str]) -> float:
    """2 × result elements × contracted elements of a dot (or a convolution's kernel window)."""
    result = parse_arrays(match.group("type"))
    operands = _operand_arrays(_balanced(line, match.end() - 1), types)
    if not result or len(operands) < 2:
        return 0.0
    out = float(np.prod(result[0].shape, dtype=np.float64))
    if match.group("op") == "dot":
        dims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line)
        contracted = [operands[0].shape[d] for d in _ints(dims.group(1))] if dims else []
        return 2.0 * out * float(np.prod(contracted, dtype=np.float64))
    labels = re.search(r"dim_labels=[^_]*_([^-]*)->", line)
    kernel = operands[1].shape
    if labels is None or "o" not in labels.group(1) or len(labels.group(1)) != len(kernel):
        return 0.0
    out_features = kernel[labels.group(1).index("o")]
    return 2.0 * out * float(np.prod(kernel, dtype=np.float64)) / max(out_features, 1)
