"""Prepare a moto S3 server for the pull tests: an IAM user whose key is the only one accepted
(moto checks signatures once INITIAL_NO_AUTH_ACTION_COUNT actions are spent), a bucket, and the
files of a local directory uploaded under a prefix. Prints the key as JSON on stdout."""
import json
import pathlib
import sys

import boto3

endpoint, bucket, prefix, src = sys.argv[1:5]
boot = dict(endpoint_url=endpoint, region_name="us-east-1",
            aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
iam = boto3.client("iam", **boot)
iam.create_user(UserName="kiln-puller")
iam.put_user_policy(
    UserName="kiln-puller", PolicyName="read-models",
    PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
key = iam.create_access_key(UserName="kiln-puller")["AccessKey"]
s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                  aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"])
s3.create_bucket(Bucket=bucket)
root = pathlib.Path(src)
for path in sorted(root.rglob("*")):
    if path.is_file():
        s3.upload_file(str(path), bucket, prefix + path.relative_to(root).as_posix())
print(json.dumps({"id": key["AccessKeyId"], "secret": key["SecretAccessKey"]}))
