"""The flow-match schedule, packing, the one denoise loop and its compiled step."""
