"""The MoE layer benchmark (`tools/bench_moe.py`), one module per suite.

  candidates  what is timed: a layer, its input and a compiled forward+backward step; the
              interleaved rounds and the result rows every suite writes
  routing     the layer suite at one shape: routing variants × capacity, dispatch, the bare
              expert matmuls (floor), a dense FFN, and the peers; its targets
  peers       Model Garden's and Keras-Hub's MoE layers, imported if installed
  scaling     time and peak memory against T, and the log-log slope
  dropless    dropless experts against capacity and the bare matmuls, outer groups
  alltoall    the 2-rank run: fixed, variable-split and padded all-to-alls
  profile     per-op profile of the MoE against its floor
  tables      the markdown tables

Every layer here is built and called through its public API (`MoE(...)`, `MoE.__call__`,
`MoE.stats`, `MoE.capacity_for`, the `router` and `experts` sublayers, the `Communicator`
interface), so the benchmark measures the layer as a model uses it.
"""
