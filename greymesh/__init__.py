"""The top floor: the `greymesh` command and the local runtime.

    cli.py        the `greymesh` command (policy_cli, taps_cli, ml_cli: its stage commands)
    runtime/      the mesh as a table of workloads (workloads.py), the supervisor that runs
                  it (supervisor.py), up/down/status/apply/scale (local.py) and the launchers
                  of the infrastructure (kafka.py, clickhouse.py, opa.py)
    demo/         the demo services and load generator the runtime runs
    scenarios.py  fault scenarios on a real mesh, recorded for the detectors
    doctor.py     the external components: installed? version? how to install

It imports the stages and the ground floor; nothing imports it.
"""
