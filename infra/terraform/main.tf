# GPU workers for vggprice: an auto-scaling group of GPU instances, each running one
# `vggprice worker --pool <pool_name> --limit 1` per GPU (systemd) from a checkout of this
# repository. The group is empty while idle: one instance starts on a schedule before the
# nightly retrain (more on demand), and an instance that has run no flow for idle_minutes
# takes itself out of the group. The instance role may read and write only the store
# bucket, read the one secret that holds the Prefect API key, and remove its own instance
# from the group.

data "aws_ssm_parameter" "ami" {
  count = var.ami_id == null ? 1 : 0
  name  = var.ami_ssm_parameter
}

# The AMI itself, for its root device name (/dev/sda1 on Ubuntu, /dev/xvda on Amazon Linux).
data "aws_ami" "worker" {
  most_recent = true
  owners      = ["amazon", "self"]
  filter {
    name   = "image-id"
    values = [coalesce(var.ami_id, try(nonsensitive(data.aws_ssm_parameter.ami[0].value), null))]
  }
}

data "aws_iam_policy_document" "assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

data "aws_iam_policy_document" "worker" {
  statement {
    sid       = "ListStore"
    actions   = ["s3:ListBucket"]
    resources = ["arn:aws:s3:::${var.bucket_name}"]
    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = ["${var.store_prefix}/*"]
    }
  }
  statement {
    sid       = "ReadWriteStore"
    actions   = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"]
    resources = ["arn:aws:s3:::${var.bucket_name}/${var.store_prefix}/*"]
  }
  statement {
    sid       = "PrefectApiKey"
    actions   = ["secretsmanager:GetSecretValue"]
    resources = [var.prefect_api_key_secret_arn]
  }
}

# An idle (or broken) worker leaves the group and lowers its desired capacity.
data "aws_iam_policy_document" "scale_in" {
  statement {
    sid       = "LeaveGroup"
    actions   = ["autoscaling:TerminateInstanceInAutoScalingGroup"]
    resources = [aws_autoscaling_group.worker.arn]
  }
}

resource "aws_iam_role" "worker" {
  name               = "${var.name}-worker"
  assume_role_policy = data.aws_iam_policy_document.assume.json
}

resource "aws_iam_role_policy" "worker" {
  name   = "${var.name}-store"
  role   = aws_iam_role.worker.id
  policy = data.aws_iam_policy_document.worker.json
}

resource "aws_iam_role_policy" "scale_in" {
  name   = "${var.name}-scale-in"
  role   = aws_iam_role.worker.id
  policy = data.aws_iam_policy_document.scale_in.json
}

resource "aws_iam_instance_profile" "worker" {
  name = "${var.name}-worker"
  role = aws_iam_role.worker.name
}

resource "aws_security_group" "worker" {
  name        = "${var.name}-worker"
  description = "vggprice GPU workers: no inbound, outbound HTTPS to the Prefect API and S3"
  vpc_id      = var.vpc_id

  egress {
    description = "HTTPS to the Prefect API, S3 and package mirrors"
    from_port   = 443
    to_port     = 443
    protocol    = "tcp"
    cidr_blocks = ["0.0.0.0/0"]
  }
}

resource "aws_launch_template" "worker" {
  name_prefix   = "${var.name}-"
  image_id      = data.aws_ami.worker.id
  instance_type = var.instance_type
  user_data = base64encode(templatefile("${path.module}/user_data.sh.tftpl", {
    pool_name       = var.pool_name
    prefect_api_url = var.prefect_api_url
    secret_arn      = var.prefect_api_key_secret_arn
    region          = var.region
    store           = "s3://${var.bucket_name}/${var.store_prefix}"
    repo_url        = var.repo_url
    repo_ref        = var.repo_ref
    idle_minutes    = var.idle_minutes
  }))

  # A worker that powers itself off is gone, not stopped and billed for its volume.
  instance_initiated_shutdown_behavior = "terminate"

  iam_instance_profile {
    arn = aws_iam_instance_profile.worker.arn
  }

  vpc_security_group_ids = [aws_security_group.worker.id]

  metadata_options {
    http_endpoint = "enabled"
    http_tokens   = "required"
  }

  monitoring {
    enabled = true
  }

  block_device_mappings {
    device_name = data.aws_ami.worker.root_device_name
    ebs {
      volume_size = var.root_volume_gb
      volume_type = "gp3"
      encrypted   = true
    }
  }

  tag_specifications {
    resource_type = "instance"
    tags = {
      Name = "${var.name}-worker"
      Pool = var.pool_name
    }
  }
}

resource "aws_autoscaling_group" "worker" {
  name                = "${var.name}-workers"
  min_size            = var.min_size
  max_size            = var.max_size
  desired_capacity    = var.min_size
  vpc_zone_identifier = var.subnet_ids
  health_check_type   = "EC2"

  launch_template {
    id      = aws_launch_template.worker.id
    version = "$Latest"
  }

  tag {
    key                 = "Name"
    value               = "${var.name}-worker"
    propagate_at_launch = true
  }

  # The schedule, `aws autoscaling set-desired-capacity` and idle workers change it.
  lifecycle {
    ignore_changes = [desired_capacity]
  }
}

# From zero on schedule: one worker shortly before the nightly retrain.
resource "aws_autoscaling_schedule" "nightly" {
  scheduled_action_name  = "${var.name}-nightly"
  autoscaling_group_name = aws_autoscaling_group.worker.name
  recurrence             = var.scale_up_recurrence
  time_zone              = "Etc/UTC"
  min_size               = -1
  max_size               = -1
  desired_capacity       = max(1, var.min_size)
}
