"""Drivers: chain stages as the user-facing commands (subprocess steps, resumable) and write the tables.

demo (tools/run_demo.py), pipeline (the step runner), few_shot_table (tools/few_shot.py, Table 4),
zero_shot (tools/zero_shot.py, Tables 2-3), part_awareness_lab, learning_ablation. The stages they
run live in part_distill/engine.
"""
