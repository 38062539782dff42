"""``triton`` placeholder: replaced by the kernel family (issue: Triton backend)."""
