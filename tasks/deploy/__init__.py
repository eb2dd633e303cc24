"""Deployment helpers: work pools, deployments, automations, the pull step."""
