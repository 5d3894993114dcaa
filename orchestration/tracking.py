"""Names shared by everything that writes or reads the MLflow store.

The sweep writes runs with these tags and metrics; the aggregation and the
figures find them by the same names. Keep them here, in one place.
"""

# Tags on every run this project writes.
TAG_ROLE = "wsml.role"            # "sweep" (parent), "trial" (search), "final" (final-seed rerun)
TAG_DATASET = "wsml.dataset"
TAG_SCHEME = "wsml.scheme"
TAG_MODE = "wsml.mode"
TAG_SEED = "wsml.seed"
TAG_TRIAL_ID = "wsml.trial_id"
TAG_SWEEP = "wsml.sweep"          # the sweep's name (also the experiment's name)
TAG_STATUS_REASON = "wsml.end_reason"   # "completed", "asha_stopped", "stop_drop", "failed: <why>"
TAG_PARENT = "mlflow.parentRunId"

ROLE_SWEEP = "sweep"
ROLE_TRIAL = "trial"
ROLE_FINAL = "final"

# Per-epoch metrics (step = epoch, 1-based).
VAL_MAP = "val_map"
TRAIN_LOSS = "train_loss"
MODIFIED_FRAC = "modified_frac"
MODIFIED_TRUE_POS_FRAC = "modified_true_pos_frac"
CLEAN_RATE = "clean_rate"
EPOCH_SECONDS = "epoch_seconds"

# Final metrics of a run.
TEST_MAP = "test_map"
BEST_VAL_MAP = "best_val_map"
BEST_EPOCH = "best_epoch"
EPOCHS_RUN = "epochs_run"
GPU_HOURS = "gpu_hours"          # device-hours spent (GPU fraction x wall hours; 0 on CPU)
TRAIN_HOURS = "train_hours"      # wall-clock hours the trial trained
