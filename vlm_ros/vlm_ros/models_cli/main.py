"""``vlm_models``: list, download, verify and export the model files of vlm_ros' configurations."""

import argparse
import json
import sys

from vlm_ros.models_cli import catalogue, download, hub, verify

EXIT_USAGE = 2


def build_parser():
    """Command line: a subcommand per job, and where the catalogue is."""
    p = argparse.ArgumentParser(
        prog='vlm_models', description=__doc__.split('\n')[0].split(': ', 1)[1],
        epilog="The hub address, token, cache and offline mode are huggingface_hub's: "
               'HF_ENDPOINT, HF_TOKEN (or `hf auth login`), HF_HOME / HF_HUB_CACHE, '
               'HF_HUB_OFFLINE=1.')
    p.add_argument('--catalogue', metavar='FILE',
                   help=f'model catalogue (default: ${catalogue.CATALOGUE_ENV}, else the '
                        'installed config/catalogue/models.yaml)')
    sub = p.add_subparsers(dest='command', metavar='COMMAND')
    sub.required = True

    s = sub.add_parser('list', help='the supported configurations, their repositories, files '
                                    'and sizes')
    s.add_argument('--sizes', action='store_true',
                   help="ask the hub for each file's exact size (needs the network)")
    s.add_argument('--json', action='store_true', help='print JSON')

    s = sub.add_parser('download', help="fetch and check a configuration's files, write its "
                                        'parameters file')
    s.add_argument('name', help='configuration (see `vlm_models list`)')
    s.add_argument('--dir', help='model folder (default: the model_dir of its parameter file)')
    s.add_argument('--params-out', metavar='FILE',
                   help='where to write the parameters (default: DIR/NAME.params.yaml)')
    s.add_argument('--retries', type=int, default=3,
                   help='resume a cut connection this many times before giving up (the next '
                        'run resumes too; default 3)')

    s = sub.add_parser('verify', help='check a model folder against a configuration')
    s.add_argument('dir', help='model folder')
    s.add_argument('--config', metavar='NAME',
                   help='configuration (default: the one the folder was downloaded for)')
    s.add_argument('--no-hub', action='store_true',
                   help="never ask the hub for checksums (use the catalogue's and the "
                        "folder's vlm_models.json)")

    s = sub.add_parser('export', help='make the files no hub publishes (needs PyTorch and '
                                      'transformers) and check them against transformers')
    s.add_argument('name', help='configuration')
    s.add_argument('--dir', help='model folder holding (or receiving) the official checkpoint '
                                 '(default: the model_dir of its parameter file)')
    s.add_argument('--no-download', action='store_true',
                   help='use the checkpoint files already in DIR; fetch nothing')
    s.add_argument('--images', nargs='*', metavar='IMAGE',
                   help='images to compare on (default: the bundled sample and a generated one)')
    s.add_argument('--tokens', type=int, default=8,
                   help='greedy tokens compared with transformers (default 8)')
    return p


def main(argv=None):
    """Run one subcommand; return its exit code."""
    args = build_parser().parse_args(argv)
    try:
        configurations = catalogue.load(args.catalogue)
        if args.command == 'list':
            return list_configurations(configurations, args.sizes, args.json)
        if args.command == 'verify':
            config = verify.pick_configuration(args.dir, configurations, args.config)
            return verify.run(args.dir, config, use_hub=not args.no_hub)
        config = catalogue.find(configurations, args.name)
        folder = args.dir or config.params().get('model_dir')
        if not folder:
            raise catalogue.CatalogueError(f'{config.name} names no model_dir: give --dir')
        if args.command == 'download':
            return download.run(config, folder, args.params_out, max(0, args.retries))
        from vlm_ros.models_cli import export
        return export.run(config, folder, fetch=not args.no_download, images=args.images,
                          tokens=args.tokens)
    except catalogue.CatalogueError as exc:
        print(f'vlm_models: {exc}', file=sys.stderr)
        return EXIT_USAGE
    except (RuntimeError, OSError) as exc:
        print(f'vlm_models: {type(exc).__name__}: {exc}', file=sys.stderr)
        return download.EXIT_FAILED
    except KeyboardInterrupt:
        print('vlm_models: interrupted; run the same command again to resume',
              file=sys.stderr)
        return 130


def list_configurations(configurations, exact_sizes=False, as_json=False):
    """Print every configuration with its repositories, files and sizes."""
    listings = {}
    if exact_sizes:
        for config in configurations:
            for source in config.sources:
                key = (source.repo, source.revision)
                if key not in listings:
                    try:
                        listings[key] = hub.list_files(*key)
                    except hub.HubError as exc:
                        print(f'vlm_models: {exc}', file=sys.stderr)
                        listings[key] = None
    rows = [_describe(c, listings) for c in configurations]
    if as_json:
        print(json.dumps(rows, indent=1))
        return 0
    for row in rows:
        total = f'  {_total_text(row)}' if row['files'] or row['exported'] else ''
        print(f'{row["name"]}  ({row["params_file"]}){total}')
        if row['title']:
            print(f'  {row["title"]}')
        if not row['sources'] and not row['exported']:
            print(f'  nothing to download: {row["notes"]}')
        for source in row['sources']:
            commit = f' = {source["commit"][:12]}' if source.get('commit') else ''
            print(f'  {source["repo"]} @ {source["revision"]}{commit}')
            for f in source['files']:
                flag = ' (optional)' if f['optional'] else ''
                size = _size_text(f['bytes'], f['approx_mb'])
                print(f'    {f["path"]:<48} {size}{flag}'.rstrip())
        for f in row['exported']:
            print(f'  made by `vlm_models export`: {f["path"]} ({f["exporter"]}) '
                  f'{_size_text(None, f["approx_mb"])}'.rstrip())
        for f in row['checkpoint']:
            shards = (' and the weight shards it names'
                      if f['path'].endswith(download.SHARD_INDEX_SUFFIX) else '')
            print(f'  read by the exporter only: {f["path"]}{shards} '
                  f'{_size_text(f["bytes"], f["approx_mb"])}'.rstrip())
    return 0


def _describe(config, listings):
    """Return a configuration as a JSON-ready dict, with the hub's sizes when known."""
    row = {'name': config.name, 'params_file': config.params_file.name, 'title': config.title,
           'notes': config.notes, 'sources': [], 'bytes': 0, 'approx_mb': 0.0,
           'files': [], 'exported': [], 'checkpoint': []}

    def file_row(source, entry):
        listing = listings.get((source.repo, source.revision))
        remote = listing.files.get(entry.path) if listing is not None else None
        size = entry.size if entry.size is not None else (remote.size if remote else None)
        return {'path': entry.path, 'optional': entry.optional, 'bytes': size,
                'approx_mb': entry.approx_mb, 'sha256': entry.sha256 or (
                    remote.sha256 if remote else None)}

    for source in config.sources:
        listing = listings.get((source.repo, source.revision))
        files = [file_row(source, f) for f in source.files]
        row['sources'].append({'repo': source.repo, 'revision': source.revision,
                               'commit': listing.commit if listing is not None else None,
                               'files': files})
        row['files'] += files
    if config.sources:
        row['checkpoint'] = [file_row(config.sources[0], f) for f in config.checkpoint]
    row['exported'] = [{'path': p.path, 'exporter': p.exporter, 'approx_mb': p.approx_mb}
                       for p in config.products]
    for f in row['files'] + row['exported']:
        if f.get('bytes'):
            row['bytes'] += f['bytes']
        elif f.get('approx_mb'):
            row['approx_mb'] += f['approx_mb']
    return row


def _total_text(row):
    megabytes = row['bytes'] / 1e6 + row['approx_mb']
    digits = 0 if megabytes >= 10 else 1
    return f'{"~" if row["approx_mb"] else ""}{megabytes:.{digits}f} MB in all'


def _size_text(size, approx_mb):
    if size:
        return f'{size / 1e6:.1f} MB' if size >= 1e5 else f'{size} bytes'
    if approx_mb:
        return f'~{approx_mb:g} MB'
    return ''


if __name__ == '__main__':
    sys.exit(main())
