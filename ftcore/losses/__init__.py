"""What is minimised: the objectives a task builds (objective.py: the interface, causal LM, classification, the
base-KL term; preference.py: DPO-family and KTO), the chunked kernel that computes them through the output head
(chunked.py) and its model side (head.py)."""
