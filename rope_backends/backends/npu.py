"""``npu`` placeholder: replaced by the stack+flatten implementation (issue: Ascend NPU backend)."""
