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
  description = "A GPU AMI with NVIDIA drivers, Python 3.11 and git (e.g. an AWS Deep Learning Base AMI)."
  type        = string
}

variable "min_size" {
  description = "Fewest GPU workers."
  type        = number
  default     = 0
}

variable "max_size" {
  description = "Most GPU workers."
  type        = number
  default     = 2
}

variable "desired_capacity" {
  description = "GPU workers to run now."
  type        = number
  default     = 1
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
  description = "Prefect work pool the workers poll."
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
  description = "Branch, tag or commit to check out."
  type        = string
  default     = "main"
}
