"""Training and evaluation of the CTS policy network (docs/DESIGN.md, "Policies").

`python -m policynet.train --dataset DATASET --exp_name NAME` trains `segm.model.policy.PolicyNet`
on labels derived from the segmentation ground truth; `python -m policynet.eval CKPT --dataset DATASET`
reports its accuracy and the quality of its top-S superpatch choice.
"""
