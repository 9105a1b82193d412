# The IVON-LoRA authors' training recipe (Cong et al. 2025), the one place pilots.sh and
# train_pair.sh take it from: linear decay to 0, no warm-up, weight decay 0, batch 8; IVON with
# clip radius 1e-3, beta2 0.99999, hess_init 1e-3 (one MC sample a step, ivonserve's default).
# One thread a run: two runs side by side on the 2-core machine beat one with two threads by ~9%.
# Sourced, not run.
# shellcheck disable=SC2034
recipe=(--batch-size 8 --lr-schedule linear --weight-decay 0 --threads 1 --seed 0 --no-progress)
recipe_ivon=(--optimizer ivon --clip-radius 1e-3 --beta2 0.99999 --hess-init 1e-3)
