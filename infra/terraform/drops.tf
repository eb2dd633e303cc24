# Drops priced on arrival (docs/events.md): the store's bucket announces every object
# created under the store's drops/ to an SQS queue; `vggprice bridge --sqs <queue url>`
# reads it and emits one vggprice.drop.ready event per drop, which the score-drop
# deployment's trigger turns into one scoring run. Messages that fail to be handled again
# and again (a bridge that keeps crashing on them) go to a dead-letter queue.
#
# aws_s3_bucket_notification owns the bucket's whole notification configuration: a bucket
# that already notifies something else needs that added here, or notify_drops = false and
# the queue wired by hand.

data "aws_caller_identity" "current" {}

resource "aws_sqs_queue" "drops_dead" {
  count                     = var.notify_drops ? 1 : 0
  name                      = "${var.name}-drops-dead"
  message_retention_seconds = 1209600 # 14 days, to look at what failed
  sqs_managed_sse_enabled   = true
}

resource "aws_sqs_queue" "drops" {
  count = var.notify_drops ? 1 : 0
  name  = "${var.name}-drops"
  # The bridge holds a drop's messages (invisible, renewed) until the drop is quiet.
  visibility_timeout_seconds = 120
  receive_wait_time_seconds  = 10
  message_retention_seconds  = 345600 # 4 days: a bridge that is down catches up
  sqs_managed_sse_enabled    = true
  redrive_policy = jsonencode({
    deadLetterTargetArn = aws_sqs_queue.drops_dead[0].arn
    maxReceiveCount     = 10
  })
}

# Only this bucket, in this account, may send to the queue.
data "aws_iam_policy_document" "drops_queue" {
  count = var.notify_drops ? 1 : 0
  statement {
    sid       = "BucketNotifiesDrops"
    actions   = ["sqs:SendMessage"]
    resources = [aws_sqs_queue.drops[0].arn]
    principals {
      type        = "Service"
      identifiers = ["s3.amazonaws.com"]
    }
    condition {
      test     = "ArnEquals"
      variable = "aws:SourceArn"
      values   = ["arn:aws:s3:::${var.bucket_name}"]
    }
    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [data.aws_caller_identity.current.account_id]
    }
  }
}

resource "aws_sqs_queue_policy" "drops" {
  count     = var.notify_drops ? 1 : 0
  queue_url = aws_sqs_queue.drops[0].id
  policy    = data.aws_iam_policy_document.drops_queue[0].json
}

resource "aws_s3_bucket_notification" "drops" {
  count  = var.notify_drops ? 1 : 0
  bucket = var.bucket_name
  queue {
    id            = "${var.name}-drops"
    queue_arn     = aws_sqs_queue.drops[0].arn
    events        = ["s3:ObjectCreated:*"]
    filter_prefix = "${var.store_prefix}/drops/"
  }
  depends_on = [aws_sqs_queue_policy.drops]
}

# What the bridge may do: read and delete the queue's messages, and read the store (it
# checks the store once at start). Attach it to the bridge's role (compose: its keys;
# Kubernetes: the service account's role).
data "aws_iam_policy_document" "bridge" {
  count = var.notify_drops ? 1 : 0
  statement {
    sid = "ReadDropNotifications"
    actions = ["sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:ChangeMessageVisibility",
    "sqs:GetQueueAttributes"]
    resources = [aws_sqs_queue.drops[0].arn]
  }
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
    sid       = "ReadStore"
    actions   = ["s3:GetObject"]
    resources = ["arn:aws:s3:::${var.bucket_name}/${var.store_prefix}/*"]
  }
}

resource "aws_iam_policy" "bridge" {
  count       = var.notify_drops ? 1 : 0
  name        = "${var.name}-drops-bridge"
  description = "vggprice bridge: read the drop notifications queue and the store"
  policy      = data.aws_iam_policy_document.bridge[0].json
}
