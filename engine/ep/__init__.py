"""Expert parallelism: the MoE layers of a DeepSeek model spread over the ranks of a group, each
rank a data-parallel attention instance with its own requests (DESIGN §8; research notes in
shared/research/ep-tbo.md §6).

- `placement.SlotMap`: which logical expert each physical slot holds, per layer, and which slot
  each (token, choice) pair goes to (a replica on the token's own rank first, else the pair's
  position plus the rank, modulo the replica count: deterministic, no random draw).
- `comm.EPComm`: everything the group sends, behind one small interface (counts, dispatch,
  combine, each with a start/wait pair; the step agreement), over torch.distributed (gloo on
  CPU; written for nccl on CUDA tensors too, not yet run there).
- `moe.ExpertParallel`: one MoE layer across the group: dispatch rows to the ranks holding their
  experts (in the model's dtype, bf16, or DeepSeek's FP8 format), run the local experts,
  combine back, sum on the source rank in ascending logical expert order (the single-process
  order), each a phase of its own.
- `tbo`: two-batch overlap, the split and the schedules (DeepSeek's prefill figure, the
  five-stage decode pipeline) run by two executors; `overlap`: the model's layers as
  operations on one micro-batch.
- `hooks.EPHooks`: the step agreement (tokens, kind, overlap vote); `eplb.LiveEPLB`: live
  rebalancing.
"""
