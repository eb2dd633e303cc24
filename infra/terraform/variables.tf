variable "region" {
  description = "AWS region of the workers and the bucket."
  type        = string
  default     = "us-east-1"
}

variable "name" {
  description = "Prefix for every resource."
  type        = string
  default     = "vggprice-gpu"
}

variable "instance_type" {
  description = "GPU instance type (g5, g6, p4d, ...)."
  type        = string
  default     = "g5.xlarge"
}

variable "ami_id" {
  description = "A GPU AMI with NVIDIA drivers and git; null: the latest AMI named by ami_ssm_parameter."
  type        = string
  default     = null
}

variable "ami_ssm_parameter" {
  description = "Public SSM parameter of the default AMI: AWS's Deep Learning Base OSS Nvidia Driver GPU AMI on Ubuntu 24.04, whose Python is 3.12."
  type        = string
  default     = "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-24.04/latest/ami-id"
}

variable "root_volume_gb" {
  description = "Root volume (gp3, encrypted) of each worker, on the AMI's own root device."
  type        = number
  default     = 200
}

variable "min_size" {
  description = "Fewest GPU workers (0: none while idle)."
  type        = number
  default     = 0
}

variable "max_size" {
  description = "Most GPU workers."
  type        = number
  default     = 2
}

variable "scale_up_recurrence" {
  description = "Cron (UTC) at which one worker starts: shortly before the nightly retrain at 02:00 UTC in prefect.yaml."
  type        = string
  default     = "45 1 * * *"
}

variable "idle_minutes" {
  description = "A worker that has run no flow for this long takes itself out of the group (scale to zero)."
  type        = number
  default     = 30
}

variable "subnet_ids" {
  description = "Private subnets for the workers."
  type        = list(string)
}

variable "vpc_id" {
  description = "VPC of the subnets."
  type        = string
}

variable "pool_name" {
  description = "Prefect work pool the workers poll (a process pool: vggprice pools apply)."
  type        = string
  default     = "gpu"
}

variable "prefect_api_url" {
  description = "PREFECT_API_URL, e.g. https://prefect.example.com/api."
  type        = string
}

variable "prefect_api_key_secret_arn" {
  description = "Secrets Manager secret holding the Prefect API key (read at boot, never in user data)."
  type        = string
}

variable "bucket_name" {
  description = "The vggprice store bucket; the workers' role is scoped to it."
  type        = string
}

variable "store_prefix" {
  description = "Prefix inside the bucket (VGGPRICE_STORE=s3://bucket/prefix)."
  type        = string
  default     = "vggprice"
}

variable "repo_url" {
  description = "Git URL of this repository, checked out on each worker."
  type        = string
}

variable "repo_ref" {
  description = "The commit (or tag) to check out: pin the one you deployed."
  type        = string
  default     = "main"
}

variable "notify_drops" {
  description = "Drops priced on arrival: the bucket notifies an SQS queue of objects created under <store_prefix>/drops/, for `vggprice bridge` (docs/events.md). The notification owns the bucket's notification configuration."
  type        = bool
  default     = true
}
