"""The actions stage: anomalies -> alerts (Slack, PagerDuty) and guarded, reversible changes
to routing and scaling, each decision recorded as evidence (docs/actions.md)."""
