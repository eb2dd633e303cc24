output "autoscaling_group" {
  description = "Scale GPU workers by changing its desired capacity."
  value       = aws_autoscaling_group.worker.name
}

output "worker_role_arn" {
  description = "The workers' IAM role (bucket-scoped)."
  value       = aws_iam_role.worker.arn
}
