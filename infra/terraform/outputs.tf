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

output "drops_queue_url" {
  description = "The queue of the bucket's drop notifications: `vggprice bridge --sqs <this>`."
  value       = var.notify_drops ? aws_sqs_queue.drops[0].url : null
}

output "bridge_policy_arn" {
  description = "The IAM policy the bridge's role needs (the queue and a read of the store)."
  value       = var.notify_drops ? aws_iam_policy.bridge[0].arn : null
}
