"""`siri demo`: SIRI against its baselines on a CPU in minutes, with nothing downloaded.

Stage 1 (`sft`) teaches a tiny Qwen2-architecture model (`model`) a synthetic task (`task`:
add 4 to 7 digits modulo 10 step by step) from traces that re-check their steps a
long-tailed number of times and repair occasional slips with those checks, with a character-level tokenizer
(`tokenizer`). Stage 2 runs RL from that base model under four budget schedules and several
seeds; `measure` scores models on the held-out split the way RL samples them, `report`
summarises them with confidence intervals and judges the success criteria, `plot` draws
the curves and the accuracy-length plane; `run` chains it all into `siri demo`.
"""
