// The type every file in dashboards/ must have: Grafana's own dashboard schema, as the
// `@grafana/schema` package (pinned in package.json) ships it, read as JSON.
//
// - The dashboard, its panels, rows, variables, annotations, links and field configs are
//   `@grafana/schema`'s `Dashboard` (the classic JSON model Grafana imports and exports),
//   with the package's own required fields and no others (an unknown key is an error).
// - Each panel is checked by its `type`: `options` against that panel plugin's `Options`
//   and `fieldConfig.defaults.custom` against its `FieldConfig` from the same package
//   (`raw/composable/<panel>/panelcfg`). Grafana fills panel options from the plugin's
//   defaults, so they are all optional here; a key the plugin does not define, or a value of
//   the wrong type or outside an enum, is an error. A panel type without a schema in the
//   package (an external plugin) is an error until it is added below.
// - Queries (`targets`) belong to the data source plugin; the package only defines what
//   every query has (`DataQuery`: `refId`, `hide`, `queryType`, `datasource`).
//
// The package's enums (e.g. `BigValueColorMode.Background`) are JSON strings or numbers in
// a dashboard: `Json<T>` turns each string enum into the union of its values.

import type * as schema from '@grafana/schema';
import type * as barchart from '@grafana/schema/dist/esm/raw/composable/barchart/panelcfg/x/BarChartPanelCfg_types.gen';
import type * as bargauge from '@grafana/schema/dist/esm/raw/composable/bargauge/panelcfg/x/BarGaugePanelCfg_types.gen';
import type * as gauge from '@grafana/schema/dist/esm/raw/composable/gauge/panelcfg/x/GaugePanelCfg_types.gen';
import type * as heatmap from '@grafana/schema/dist/esm/raw/composable/heatmap/panelcfg/x/HeatmapPanelCfg_types.gen';
import type * as histogram from '@grafana/schema/dist/esm/raw/composable/histogram/panelcfg/x/HistogramPanelCfg_types.gen';
import type * as piechart from '@grafana/schema/dist/esm/raw/composable/piechart/panelcfg/x/PieChartPanelCfg_types.gen';
import type * as stat from '@grafana/schema/dist/esm/raw/composable/stat/panelcfg/x/StatPanelCfg_types.gen';
import type * as statetimeline from '@grafana/schema/dist/esm/raw/composable/statetimeline/panelcfg/x/StateTimelinePanelCfg_types.gen';
import type * as statushistory from '@grafana/schema/dist/esm/raw/composable/statushistory/panelcfg/x/StatusHistoryPanelCfg_types.gen';
import type * as table from '@grafana/schema/dist/esm/raw/composable/table/panelcfg/x/TablePanelCfg_types.gen';
import type * as text from '@grafana/schema/dist/esm/raw/composable/text/panelcfg/x/TextPanelCfg_types.gen';
import type * as timeseries from '@grafana/schema/dist/esm/raw/composable/timeseries/panelcfg/x/TimeSeriesPanelCfg_types.gen';

type IsAny<T> = 0 extends 1 & T ? true : false;

/** `T` as it appears in JSON: string enums become the union of their values. */
export type Json<T> =
  IsAny<T> extends true
    ? T
    : T extends string
      ? `${T}`
      : T extends number | boolean | null | undefined
        ? T
        : T extends readonly (infer U)[]
          ? Json<U>[]
          : T extends object
            ? { [K in keyof T]: Json<T[K]> }
            : T;

/** Like `Json<T>`, with every key optional at every depth (options filled from defaults). */
export type PartialJson<T> =
  IsAny<T> extends true
    ? T
    : T extends string
      ? `${T}`
      : T extends number | boolean | null | undefined
        ? T
        : T extends readonly (infer U)[]
          ? PartialJson<U>[]
          : T extends object
            ? { [K in keyof T]?: PartialJson<T[K]> }
            : T;

/** What every query has; the rest belongs to the data source plugin. */
type Target = Json<schema.DataQuery> & Record<string, unknown>;

type FieldConfigSource<Custom> = Omit<Json<schema.FieldConfigSource>, 'defaults'> & {
  defaults: Omit<Json<schema.FieldConfig>, 'custom'> & { custom?: PartialJson<Custom> };
};

type Base = Omit<Json<schema.Panel>, 'type' | 'options' | 'fieldConfig' | 'targets'> & {
  targets?: Target[];
};

/** A panel of plugin `Type`, its options and custom field config as that plugin defines them. */
type Typed<Type extends string, Options, Custom = Record<string, never>> = Base & {
  type: Type;
  options?: PartialJson<Options>;
  fieldConfig?: FieldConfigSource<Custom>;
};

/** The core panel plugins whose schema the package ships, by plugin id. */
export type Panel =
  | Typed<'barchart', barchart.Options, barchart.FieldConfig>
  | Typed<'bargauge', bargauge.Options>
  | Typed<'gauge', gauge.Options>
  | Typed<'heatmap', heatmap.Options, heatmap.FieldConfig>
  | Typed<'histogram', histogram.Options, histogram.FieldConfig>
  | Typed<'piechart', piechart.Options, piechart.FieldConfig>
  | Typed<'stat', stat.Options>
  | Typed<'state-timeline', statetimeline.Options, statetimeline.FieldConfig>
  | Typed<'status-history', statushistory.Options, statushistory.FieldConfig>
  | Typed<'table', table.Options, table.FieldConfig>
  | Typed<'text', text.Options>
  | Typed<'timeseries', timeseries.Options, timeseries.FieldConfig>;

export type RowPanel = Omit<Json<schema.RowPanel>, 'panels'> & { panels: Panel[] };

export type Dashboard = Omit<Json<schema.Dashboard>, 'panels'> & {
  panels?: (Panel | RowPanel)[];
};
