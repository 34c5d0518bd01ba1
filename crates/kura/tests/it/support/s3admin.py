"""What a bucket's administrator does beside kura in the Object Lock tests (boto3, moto's own
dependency): create a locked bucket, let time pass for some objects (shorten a GOVERNANCE
retention, which needs the bypass permission kura never uses), read retentions and versions."""
import boto3, datetime, sys

s3 = boto3.client("s3", endpoint_url=sys.argv[1], aws_access_key_id="kura", aws_secret_access_key="kura-secret-key", region_name="us-east-1")
cmd, bucket = sys.argv[2], sys.argv[3]
arg = sys.argv[4] if len(sys.argv) > 4 else ""

def versions(prefix):
    out = []
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=prefix):
        out += [(v["Key"], v["VersionId"]) for v in page.get("Versions", [])]
    return out

if cmd == "mkbucket":
    s3.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    s3.put_object_lock_configuration(Bucket=bucket, ObjectLockConfiguration={
        "ObjectLockEnabled": "Enabled", "Rule": {"DefaultRetention": {"Mode": "GOVERNANCE", "Days": 1}}})
elif cmd == "expire":
    # Every version under the prefix unlocks a second from now.
    until = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=1)
    for key, vid in versions(arg):
        s3.put_object_retention(Bucket=bucket, Key=key, VersionId=vid, BypassGovernanceRetention=True,
                                Retention={"Mode": "GOVERNANCE", "RetainUntilDate": until})
elif cmd == "retention":
    h = s3.head_object(Bucket=bucket, Key=arg)
    print(int(h["ObjectLockRetainUntilDate"].timestamp()))
elif cmd == "min_retention":
    # The earliest lock end among the current objects under the prefix.
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=arg) for o in page.get("Contents", [])]
    print(min(int(s3.head_object(Bucket=bucket, Key=k)["ObjectLockRetainUntilDate"].timestamp()) for k in keys))
elif cmd == "versions":
    print(len(versions(arg)))
