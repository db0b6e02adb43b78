"""The reliability harness, one part a module (import each name from the part that holds it):

- ``plan``: the planned stream (Body, Plan, plan_events, interleave) and the run's sizes (SOAK, sized);
- ``feeder``: the Feeder thread publishing a plan with publisher confirms and recording it in events.jsonl;
- ``supervisor``: K workers restarted as they die (Supervisor, Death) and halt_all for teardown;
- ``private_redis``: a throw-away redis-server a test stops and starts (PrivateRedis);
- ``probe``: the live state the drain and the oracle read (Probe, max_attempts, failed_queue_messages);
- ``scenario``: one scenario from seed to oracle and its report line (Scenario, report_path, write_report).
"""
