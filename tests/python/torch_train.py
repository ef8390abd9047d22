"""A small real PyTorch training loop on kdkit (used by test_kdkit_crash.py).

    torch_train.py OUTPUT_DIR TOTAL_STEPS CKPT_EVERY

An MLP learns a fixed random regression task with Adam, one thread, no
randomness besides the data, which is a pure function of the dataset
position.  Progress goes to a kdkit ProgressTracker; every CKPT_EVERY steps
model and optimizer state go to checkpoint_<step>.safetensors through
kdkit.save_checkpoint and are recorded with record_checkpoint.  Started
again after any crash, it resumes from get_recovery_checkpoint() and so
ends with the same weights as a run never interrupted.  Prints "step N"
after each step (the test's kill trigger).
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kdtest  # noqa: E402,F401  (puts python/ on the path)
import kdkit  # noqa: E402

IN, HID, OUT, BATCH, NDATA = 16, 32, 4, 8, 512


def data():
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(NDATA, IN, generator=g)
    w = torch.randn(IN, OUT, generator=g)
    return x, torch.tanh(x @ w)


def batch_at(x, y, pos):
    idx = [(pos + i) % NDATA for i in range(BATCH)]
    return x[idx], y[idx]


def main():
    out, total, every = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(IN, HID), torch.nn.Tanh(),
                                torch.nn.Linear(HID, OUT))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = data()
    config = {"model": [IN, HID, OUT], "lr": 1e-2, "batch": BATCH, "steps": total}
    tracker = kdkit.ProgressTracker(output_dir=out, config=config, total_steps=total)
    step, pos = 0, 0
    rc = tracker.get_recovery_checkpoint()
    if rc:
        t, meta = kdkit.load_checkpoint(rc.checkpoint_path, framework="torch",
                                        expect_sha256=rc.hash)
        model.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
        params = list(model.parameters())
        for i, p in enumerate(params):
            opt.state[p] = {"step": t["opt.%d.step" % i].clone().reshape(()),
                            "exp_avg": t["opt.%d.exp_avg" % i].clone(),
                            "exp_avg_sq": t["opt.%d.exp_avg_sq" % i].clone()}
        step, pos = rc.step, rc.dataset_position
        assert int(meta["step"]) == step
        tracker.rewind(step)
    while step < total:
        xb, yb = batch_at(x, y, pos)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(xb), yb)
        loss.backward()
        opt.step()
        step += 1
        pos += BATCH
        tracker.update_metrics(step=step, loss=loss.item(), loss_components={"ce": loss},
                               learning_rate=1e-2, samples_processed=step * BATCH,
                               tokens_processed=step * BATCH * IN)
        if step % every == 0 or step == total:
            tensors = {"model." + k: v for k, v in model.state_dict().items()}
            for i, p in enumerate(model.parameters()):
                s = opt.state[p]
                tensors["opt.%d.step" % i] = s["step"].reshape(1)
                tensors["opt.%d.exp_avg" % i] = s["exp_avg"]
                tensors["opt.%d.exp_avg_sq" % i] = s["exp_avg_sq"]
            path = os.path.join(out, "checkpoint_%d.safetensors" % step)
            kdkit.save_checkpoint(path, tensors, {"step": str(step), "pos": str(pos)})
            tracker.record_checkpoint(step=step, checkpoint_path=path, dataset_position=pos,
                                      recovery_tags=["every_%d_steps" % every])
        print("step", step, flush=True)
    tracker.close()


if __name__ == "__main__":
    main()
