"""The shape of a faiss IVF-PQ index (``ris.faiss_index``): its parameters, the faiss factory
string they make, and how they are sized from the row count and dimension."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class IvfPqParams:
    """Index shape. ``choose_params`` sizes it from the row count and dimension."""

    nlist: int  # coarse cells
    m: int  # PQ sub-quantizers = code bytes per vector (at 8 bits)
    nbits: int = 8
    opq: bool = True  # learned rotation before PQ: spreads variance evenly over the sub-vectors
    nprobe: int = 32  # cells visited per query
    rerank: int = 100  # shortlist (at least 4 x k) re-ranked exactly from the stored vectors; 0 = approximate distances
    train_rows: int = 100_000
    codec: str = "pq"  # "sq8" (1 byte per dimension) below ~10,000 rows, too few to train PQ codebooks
    opq_dim: int = 0  # dimension OPQ rotates (and projects) to before IVF-PQ; 0 = the input's
    fastscan: bool = False  # 4-bit codes scanned with in-register lookup tables (faiss "PQ{m}x4fs")
    nprobe_chosen: bool = False  # asked for (--nprobe): kept; else the default for the size, at every load

    def factory(self, dim: int) -> str:
        coarse = f"IVF{self.nlist}_HNSW32" if self.nlist >= 1024 else f"IVF{self.nlist}"
        if self.codec == "sq8":
            return f"{coarse},SQ8"
        opq = f"OPQ{self.m}_{self.opq_dim or dim}," if self.opq else ""
        return f"{opq}{coarse},PQ{self.m}x{self.nbits}{'fs' if self.fastscan else ''}"

    def code_bytes(self, dim: int) -> float:
        """Bytes of code per vector (its 8-byte id comes on top)."""
        return float(dim) if self.codec == "sq8" else self.m * self.nbits / 8


SCAN_ROWS = 4096  # rows the default probes scan at least (see choose_params)


def default_nprobe(n: int, nlist: int) -> int:
    """Cells probed: enough to scan ``SCAN_ROWS`` rows, at least 32, at most every cell. Why: 32
    probes kept recall@10 (re-ranked) at 0.98 at 1M rows (4,096 cells, ~7,800 rows scanned), but a
    small collection's neighbours lie in more of its cells: at 20,000 synthetic rows (512 cells,
    ~1,250 rows scanned) it was 0.89 (bench/README.md, 2026-12-03). From ~262,000 rows on this is 32."""
    return int(min(nlist, max(32, math.ceil(SCAN_ROWS * nlist / max(1, n)))))


OLD_DEFAULT_NPROBE = 32  # before 2026-12-03 the automatic nprobe was min(nlist, 32) at every size


def saved_nprobe(params: IvfPqParams, count: int, chosen: bool | None) -> IvfPqParams:
    """``params`` of a saved index holding ``count`` vectors with the nprobe to search with: the
    one asked for is kept, an automatic one is today's ``default_nprobe`` for ``count`` rows.
    ``chosen`` None (saved before it was recorded): chosen unless it is the old automatic default,
    so indexes saved before 2026-12-03 no longer keep 32 probes at every size."""
    if chosen is None:
        chosen = int(params.nprobe) != min(int(params.nlist), OLD_DEFAULT_NPROBE)
    params.nprobe_chosen = bool(chosen)
    if not chosen:
        params.nprobe = default_nprobe(count, int(params.nlist))
    return params


def choose_params(n: int, dim: int, **override) -> IvfPqParams:
    """nlist ~ 4 sqrt(N) (a power of two, at most 4096, >= 39 training rows per cell); nprobe
    from ``default_nprobe``; m = 64 bytes (fewer for small dimensions: it must divide the
    dimension); 8-bit codes once there are enough rows to train 256 centroids per sub-quantizer
    (below that, 8-bit scalar codes: a small database does not need compressing); OPQ from
    100,000 rows (below, its training costs more than the index is worth)."""
    nlist = 2 ** int(round(math.log2(max(1.0, 4 * math.sqrt(n)))))
    nlist = int(max(1, min(nlist, 4096, n // 39)))
    train = int(min(n, max(100_000, 64 * nlist)))
    m = max(d for d in range(1, min(64, max(1, dim // 2)) + 1) if dim % d == 0)
    codec = "pq" if train >= 39 * 256 else "sq8"
    p = IvfPqParams(nlist=nlist, m=m if codec == "pq" else dim, nbits=8, opq=codec == "pq" and n >= 100_000 and m >= 2,
                    nprobe=default_nprobe(n, nlist), train_rows=train, codec=codec)
    for k, v in override.items():
        setattr(p, k, v)
    p.nprobe_chosen = p.nprobe_chosen or "nprobe" in override
    return p


def asked_settings(meta: dict) -> dict:
    """The search settings a saved index's metadata holds that a rebuild keeps (``choose_params``
    overrides): its ``rerank``, and its ``nprobe`` when it was asked for (``saved_nprobe``'s rule
    for indexes saved before that was recorded); {} for metadata that cannot be read as such."""
    try:
        params = meta["params"]
        nprobe, nlist, rerank = int(params["nprobe"]), int(params["nlist"]), int(params["rerank"])
        chosen = meta.get("nprobe_chosen", params.get("nprobe_chosen"))
    except (KeyError, TypeError, ValueError):
        return {}
    if chosen is None:
        chosen = nprobe != min(nlist, OLD_DEFAULT_NPROBE)
    return {**({"rerank": rerank} if rerank >= 0 else {}), **({"nprobe": nprobe} if chosen and nprobe >= 1 else {})}
