"""`siri demo`: interleaved compression on a CPU in minutes, with nothing downloaded.

Stage 1 (`sft`) teaches a tiny Qwen2-architecture model (`model`) a synthetic task
(`task`: add two digits) from solution traces that re-check their work a
long-tailed number of times, with a character-level tokenizer (`tokenizer`). Stage 2 runs
RL from that base model at a constant budget and under SIRI's interleaved budget; `measure`
scores models the way RL samples them and `plot` draws the curves and the table;
`run` chains it all into `siri demo`.
"""
