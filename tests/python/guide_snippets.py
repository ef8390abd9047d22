"""The Python snippets of the product guide, as the guide prints them.

The only edit is the import: the guide's

    from training.progress_tracker import ProgressTracker
    from training.distill_kd import main

becomes ``from kdkit import ProgressTracker`` (the second line imports the
guide's own trainer, which is not part of kdkit).  tests/python/
test_kdkit_guide.py runs each snippet with the free variables it uses
(training_config, dataloader, model, prompt, ...) defined.
"""

SNIPPETS = {}

SNIPPETS['initialization'] = '''\
from kdkit import ProgressTracker

# Create progress tracker
tracker = ProgressTracker(
    output_dir=Path("training_progress"),
    config=training_config,
    total_steps=10000,
)

# Optional: Resume from specific session
# tracker = ProgressTracker(
#     output_dir=Path("training_progress"),
#     config=training_config,
#     total_steps=10000,
#     session_id="training_20251116_120000_abc12345"
# )
'''

SNIPPETS['recording_metrics'] = '''\
# During training loop
for step, batch in enumerate(dataloader):
    # ... training step ...

    tracker.update_metrics(
        step=step,
        loss=loss_value,
        loss_components={
            "kd": kd_loss,
            "ce": ce_loss,
            "intermediate": intermediate_loss,
        },
        learning_rate=current_lr,
        samples_processed=step * batch_size,
        tokens_processed=step * batch_size * seq_len,
        throughput_samples_per_sec=current_throughput_samples,
        throughput_tokens_per_sec=current_throughput_tokens,
    )
'''

SNIPPETS['recording_checkpoints'] = '''\
# When saving checkpoint
torch.save(model.state_dict(), checkpoint_path)

tracker.record_checkpoint(
    step=step,
    checkpoint_path=checkpoint_path,
    dataset_position=current_sample_index,
    recovery_tags=["every_1k_steps", "best_loss"] if is_best else ["every_1k_steps"],
)
'''

SNIPPETS['api_response_recovery'] = '''\
# When receiving teacher response
response = teacher_model.generate(prompt)

# Cache response with SHA256 hashing
prompt_hash = hashlib.sha256(prompt.encode()).hexdigest()
tracker.record_api_response(
    prompt_hash=prompt_hash,
    response=response,
    cost=estimated_api_cost,
)

# On connection failure, retry with exponential backoff
try:
    response = teacher_model.generate(prompt)
except ConnectionError as e:
    tracker.record_connection_failure(
        retry_count=attempt,
        error=str(e),
    )
    # Implement exponential backoff
    time.sleep(2 ** attempt)
'''

SNIPPETS['pause_resume'] = '''\
# Before pausing training
pause_start = time.time()
tracker.record_pause(duration=time.time() - pause_start)
tracker.save()

# When resuming
tracker = ProgressTracker(
    output_dir=Path("training_progress"),
    config=training_config,
    total_steps=10000,
    session_id="training_20251116_120000_abc12345",  # Load previous session
)

# Get recovery checkpoint
recovery_checkpoint = tracker.get_recovery_checkpoint()
if recovery_checkpoint:
    checkpoint_path = recovery_checkpoint.checkpoint_path
    dataset_position = recovery_checkpoint.dataset_position
    # Load checkpoint and resume from dataset_position
'''

SNIPPETS['monitoring_progress'] = '''\
# Get progress summary anytime
summary = tracker.get_progress_summary()

print(f"Session: {summary['session_id']}")
print(f"Progress: {summary['progress_pct']:.1f}%")
print(f"Steps: {summary['steps_completed']}/{summary['total_steps_target']}")
print(f"Elapsed: {summary['elapsed_wall_clock_hours']:.1f} hours")
print(f"ETA: {summary['estimated_remaining_hours']:.1f} hours")
print(f"Loss Trend: {summary['loss_trend']}")
'''

SNIPPETS['scenario_1'] = '''\
# System automatically retries with exponential backoff
for attempt in range(5):
    try:
        response = api_client.call(prompt)
        tracker.record_api_response(prompt_hash, response, cost)
        break
    except ConnectionError as e:
        tracker.record_connection_failure(attempt, str(e))
        if attempt < 4:
            time.sleep(2 ** attempt)
        else:
            # Fall back to cached response if available
            cached_response = teacher_cache.get(prompt)
            if cached_response:
                response = cached_response
            else:
                raise
'''

SNIPPETS['check_cache_first'] = '''\
# Always check cache first
cached_response = teacher_cache.get(prompt)
if cached_response:
    response = cached_response
else:
    response = api_client.call(prompt)
    teacher_cache.put(prompt, response)
    tracker.record_api_response(prompt_hash, response, cost)
'''
