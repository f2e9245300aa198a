"""Benchmark shapes in one place (tests may import them too)."""

# rerank: one query caption against K gathered candidate images of a gallery
RERANK_SHAPES = {
    # compute-bound on CPU: arithmetic intensity ~W/2 FLOP/byte in fp32
    "rerank_W32_R36_D1024_K1000": dict(words=32, regions=36, dim=1024, candidates=1000, gallery=1000),
    # bandwidth-bound on CPU
    "rerank_W20_R36_D768_K5000": dict(words=20, regions=36, dim=768, candidates=5000, gallery=5000),
}

# the machine's reference GEMM, measured in the same run
GEMM_SIZE = 2048
