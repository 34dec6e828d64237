"""What each of session 13's four edits to the sm_90 attention is worth (run on the GPU machine; session 14 took one back),
and the later ones (sessions 14 and 16):

    python3 benchmarks/probe_attention_variants.py --out $OUT/attention-variants.json
    NCU=1 ncu --clock-control none -k regex:flashdiff_probe_att --metrics gpu__time_duration.sum --csv \\
        python3 benchmarks/probe_attention_variants.py

Each variant is the shipped source with one of the session's edits taken back (as the code was before it),
launched through the real launcher (``flash_attention_sm90``), timed in turn with the others and cuDNN
(``common.interleaved``, medians of queued calls), or under Nsight Compute (NCU=1: three calls each).
  as_is          the kernel as it ships
  runtime_tail   the key-tail test as a run-time flag again (every key tile tests each key)
  zeroing        S's accumulators zeroed by the loop and the first k16 wgmma accumulating onto them
  skip_unmoved   a warp whose rows' maxima did not move skips O *= corr (a vote per tile; shipped in session 13,
                 measured slower in session 14 and taken out: this variant puts it back)
  one_max_chain  each row's maximum in one chain of 32 dependent FMNMX (MAX_CHAINS = 1)
  session12      the other edits taken back: the kernel as session 12 ran it
  scale_from_memory  (session 14) each CTA reads the softmax scale from its (1,) input, a host-written array in
                 MLX's managed scalar pool, instead of the SCALE_BITS compile-time constant
  last_tile_in_loop  (session 17) the loop over every key tile j >= 1 with the last tile's copy behind a branch on j
                 inside it, and the last P V over all 128 keys, as before session 17 (now the last tile runs after
                 the loop and its P V stops at Lk)
  desc_per_step  (session 16) each wgmma's shared-memory descriptors made from its step's address (fd_desc: three
                 or four integer instructions each), as before session 16, instead of one made per call and moved
                 along by one add (fd_desc_add)
--lengths L:heads,...; --persistent: the persistent form instead (without the per-tile form's own variants); --mask: a
boolean key mask with the last 1% of keys masked (the case attention() dispatches to this kernel); --variants REGEX:
only those variants.
"""

import argparse
import os
import re
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flashdiff.kernels import _attention_sm90 as att, _attention_sm90_forms as forms  # noqa: E402
from common import interleaved, median_call, write_json  # noqa: E402

# (edits of the header, edits of the kernel body); each old text must occur exactly once
_RUNTIME_TAIL = [
    ("    constexpr bool tail = decltype(tail_flag)::value;  // tile j reaches past Lk",
     "    const bool tail = (j + 1) * BN > LK;"),
    ("      constexpr bool tail = decltype(tail_flag)::value;", "      const bool tail = (j + 1) * BN > LK;"),
    ("    if (LK % BN != 0 && j == NT - 1) step(j, fd_flag<true>{});\n    else step(j, fd_flag<false>{});",
     "    step(j, fd_flag<false>{});"),
]
# session 16: each wgmma's shared-memory descriptors moved along from one made per call (fd_desc_add) instead of made
# from each step's address (fd_desc): this takes that back
_DESC_HEADER = [
    ("""  const unsigned long long da = fd_desc(a_addr), db = fd_desc(b_addr);  // then moved along: one add per step
#pragma unroll
  for (int kk = 0; kk < 8; ++kk) {
    const unsigned off = (kk >> 2) * chunk + (kk & 3) * 32;
    const unsigned long long dak = fd_desc_add(da, off), dbk = fd_desc_add(db, off);
    if (kk == 0 && BF16) fd_wgmma_ss_first_bf16(d, dak, dbk);
    else if (kk == 0) fd_wgmma_ss_first_f16(d, dak, dbk);
    else if (BF16) fd_wgmma_ss_bf16(d, dak, dbk);
    else fd_wgmma_ss_f16(d, dak, dbk);""",
     """#pragma unroll
  for (int kk = 0; kk < 8; ++kk) {
    const unsigned off = (kk >> 2) * chunk + (kk & 3) * 32;
    if (kk == 0 && BF16) fd_wgmma_ss_first_bf16(d, fd_desc(a_addr + off), fd_desc(b_addr + off));
    else if (kk == 0) fd_wgmma_ss_first_f16(d, fd_desc(a_addr + off), fd_desc(b_addr + off));
    else if (BF16) fd_wgmma_ss_bf16(d, fd_desc(a_addr + off), fd_desc(b_addr + off));
    else fd_wgmma_ss_f16(d, fd_desc(a_addr + off), fd_desc(b_addr + off));"""),
    ("""  const unsigned long long db = fd_desc_mn(b_addr, chunk);
#pragma unroll
  for (int kk = 0; kk < KSTEPS; ++kk) {
    if (BF16) fd_wgmma_rs_bf16(d, a[kk], fd_desc_add(db, kk * 2048));
    else fd_wgmma_rs_f16(d, a[kk], fd_desc_add(db, kk * 2048));""",
     """#pragma unroll
  for (int kk = 0; kk < KSTEPS; ++kk) {
    if (BF16) fd_wgmma_rs_bf16(d, a[kk], fd_desc_mn(b_addr + kk * 2048, chunk));
    else fd_wgmma_rs_f16(d, a[kk], fd_desc_mn(b_addr + kk * 2048, chunk));"""),
]
_ZEROING_HEADER = [("    if (kk == 0 && BF16) fd_wgmma_ss_first_bf16(d, dak, dbk);\n"
                    "    else if (kk == 0) fd_wgmma_ss_first_f16(d, dak, dbk);\n"
                    "    else if (BF16)", "    if (BF16)")]
_ZEROING_HEADER_S12 = [("    if (kk == 0 && BF16) fd_wgmma_ss_first_bf16(d, fd_desc(a_addr + off), fd_desc(b_addr + off));\n"
                        "    else if (kk == 0) fd_wgmma_ss_first_f16(d, fd_desc(a_addr + off), fd_desc(b_addr + off));\n"
                        "    else if (BF16)", "    if (BF16)")]
_ZEROING = [("    fd_mbar_wait(fd_smem_addr(&k_full[j % STAGES]), (j / STAGES) & 1);\n  };",
             "    fd_mbar_wait(fd_smem_addr(&k_full[j % STAGES]), (j / STAGES) & 1);\n#pragma unroll\n"
             "    for (int i = 0; i < 64; ++i) sc[i] = 0.0f;\n    fd_fence64(sc);\n  };")]
# session 17: the last key tile as a compile-time copy of the loop's step, after the loop, with its P V over the keys
# up to Lk only; this takes both back (the loop over every tile j >= 1, the tail copy behind a branch on j inside it)
_LAST_STEP = "  if (LK % BN != 0 && NT > 1) step(NT - 1, fd_flag<true>{});\n"
_LAST_TILE_IN_LOOP = [
    (att._SOURCE[att._SOURCE.index("  // tile j >= 1: S_j and P_{j-1} V_{j-1} in flight together."):
                 att._SOURCE.index(_LAST_STEP) + len(_LAST_STEP)],
     """  for (int j = 1; j < NT; ++j) {  // tile j: S_j and P_{j-1} V_{j-1} in flight together
    const int s = j % STAGES, sp = (j - 1) % STAGES;
    on_tile(j, fetch_bias);
    load_scores(j);
    fd_mbar_wait(fd_smem_addr(&v_full[sp]), ((j - 1) / STAGES) & 1);
    if (PINGPONG) fd_bar_sync(2 + wg);
    fd_mma_ss128<IS_BF16>(sc, q_addr, k_base + s * TILE_BYTES, CHUNK);
    fd_fence64(o);
    fd_mma_rs128<IS_BF16>(o, a, v_base + sp * TILE_BYTES, CHUNK);
    if (PINGPONG) fd_bar_arrive(3 - wg);
    asm volatile("wgmma.wait_group.sync.aligned 1;\\n" ::: "memory");  // S_j has landed
    fd_fence64(sc);
    if (lane == 0) fd_mbar_arrive(fd_smem_addr(&k_empty[s]));
    on_tile(j, softmax);
    asm volatile("wgmma.wait_group.sync.aligned 0;\\n" ::: "memory");  // P_{j-1} V_{j-1} has landed
    fd_fence64(o);
    if (lane == 0) fd_mbar_arrive(fd_smem_addr(&v_empty[sp]));
    rescale_and_pack();
  }
"""),
    ("fd_mma_rs128<IS_BF16, LAST_PV_STEPS>(o, a,", "fd_mma_rs128<IS_BF16>(o, a,"),
]
_SKIP_UNMOVED = [("constexpr bool SKIP_UNMOVED = false;", "constexpr bool SKIP_UNMOVED = true;")]
_ONE_MAX_CHAIN = [("constexpr int MAX_CHAINS = 4;", "constexpr int MAX_CHAINS = 1;")]
_SCALE_FROM_MEMORY = [("const float sl2 = __int_as_float(SCALE_BITS) * LOG2E;", "const float sl2 = scale[0] * LOG2E;")]
VARIANTS = {
    "as_is": ([], []),
    "runtime_tail": ([], _RUNTIME_TAIL),
    "zeroing": (_ZEROING_HEADER, _ZEROING),
    "skip_unmoved": ([], _SKIP_UNMOVED),
    "one_max_chain": ([], _ONE_MAX_CHAIN),
    "scale_from_memory": ([], _SCALE_FROM_MEMORY),
    "desc_per_step": (_DESC_HEADER, []),
    "last_tile_in_loop": ([], _LAST_TILE_IN_LOOP),
    "session12": (_DESC_HEADER + _ZEROING_HEADER_S12,
                  _LAST_TILE_IN_LOOP + _RUNTIME_TAIL + _ZEROING + _ONE_MAX_CHAIN + _SCALE_FROM_MEMORY),
}


def _edit(text: str, edits) -> str:
    for old, new in edits:
        if text.count(old) != 1:
            raise AssertionError(f"the kernel's source changed: {old!r} occurs {text.count(old)} times")
        text = text.replace(old, new)
    return text


PER_TILE_ONLY = {"last_tile_in_loop", "session12"}  # they take back edits the persistent form never had


def variants(persistent: bool) -> list:
    return [name for name in VARIANTS if not (persistent and name in PER_TILE_ONLY)]


def variant_sources(name: str, persistent: bool = False) -> tuple[str, str]:
    """(header, kernel body) of variant `name`, of the per-tile or the persistent form."""
    if persistent and name in PER_TILE_ONLY:
        raise ValueError(f"variant {name!r} takes back an edit of the per-tile form only")
    header_edits, body_edits = VARIANTS[name]
    return _edit(att._HEADER, header_edits), _edit(forms._SOURCE_PERSISTENT if persistent else att._SOURCE, body_edits)


def variant_kernel(name: str, persistent: bool):
    """Variant `name` of the main kernel, built as flash_attention_sm90 builds the shipped one."""
    header, body = variant_sources(name, persistent)
    return att.main_kernel(f"flashdiff_probe_att_{name}", body, header, persistent)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="")
    ap.add_argument("--lengths", default="4608:24,4621:24,4736:24,16384:24")
    ap.add_argument("--persistent", action="store_true")
    ap.add_argument("--mask", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", default="", help="a regular expression: only the variants it finds (as_is always)")
    args = ap.parse_args()
    names = [n for n in variants(args.persistent) if n == "as_is" or re.search(args.variants, n)]
    ncu = bool(os.environ.get("NCU"))
    rows = []
    for case in args.lengths.split(","):
        length, heads = (int(v) for v in case.split(":"))
        q, k, v = (mx.random.normal((1, heads, length, 128)).astype(mx.bfloat16) for _ in range(3))
        bias = None
        if args.mask:
            bias = mx.where(mx.arange(length) < length - length // 100, 0.0, -float("inf"))[None].astype(mx.float32)
        mx.eval(q, k, v)
        scale = 128 ** -0.5
        kernels = {name: variant_kernel(name, args.persistent) for name in names}

        def launch(name):  # flash_attention_sm90 with its kernel cache pointing at variant `name`
            att._kernel = lambda persistent=False: kernels[name]
            return att.flash_attention_sm90(q, k, v, scale, bias, persistent=args.persistent)

        fns = {name: (lambda name=name: launch(name)) for name in names}
        outs = {name: fn() for name, fn in fns.items()}
        mx.eval(outs)
        if ncu:  # three more calls of each variant, for Nsight Compute's kernel times
            for fn in fns.values():
                for _ in range(3):
                    mx.eval(fn())
            continue
        sdpa_mask = None if bias is None else bias[:, None, None, :].astype(mx.bfloat16)
        fns["sdpa"] = lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=sdpa_mask)
        times = interleaved(fns, lambda fn: median_call(fn, 10, 5, 2), args.rounds)
        row = dict(L=length, heads=heads, persistent=args.persistent, mask=args.mask,
                   **{f"{n}_ms": t * 1e3 for n, t in times.items()},
                   **{f"{n}_vs_sdpa": times["sdpa"] / t for n, t in times.items() if n != "sdpa"},
                   **{f"{n}_equals_as_is": mx.array_equal(outs[n], outs["as_is"]).item() for n in names})
        rows.append(row)
        print(row, flush=True)
        if args.out:
            write_json(Path(args.out), {"rows": rows})


if __name__ == "__main__":
    main()
