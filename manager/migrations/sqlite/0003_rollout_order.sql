-- The rollout engine reads a rollout's devices in order and by step several
-- times a second; without these it sorts or scans the whole list each time.
CREATE INDEX rollout_devices_order ON rollout_devices (rollout_id, position);
CREATE INDEX rollout_devices_step ON rollout_devices (rollout_id, status);
