"""The edit machinery behind the public names in `mlx_edit`.

`pipeline` (FluxPipeline: one model folder, its components, prompts, LoRAs and masks), the edit
classes built on it (`fill.FluxFill`, `kontext.FluxKontext`, `klein.FluxKlein`), large canvases
(`large`, `tiling`), masks (`masking`, `automask`, `segment` for SAM 2.1 clicks, `text_segment`
for SAM 3 phrases), prompt encoders (`text` for CLIP+T5, `text_qwen3`) and their caches, LoRAs,
candidate ranking and the memory estimate. See ARCHITECTURE.md, "Layout".
"""
