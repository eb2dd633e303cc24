output "autoscaling_group" {
  description = "The GPU workers' group: one starts on schedule and leaves when idle; `aws autoscaling set-desired-capacity` starts more at any time."
  value       = aws_autoscaling_group.worker.name
}

output "worker_role_arn" {
  description = "The workers' IAM role (bucket-scoped)."
  value       = aws_iam_role.worker.arn
}

output "ami_id" {
  description = "The AMI the workers boot."
  value       = data.aws_ami.worker.id
}
